"""The networks: token ids and a carried state in, features and log-probabilities out.

Every network keeps the contract written in `lm/models/network.py`; training, evaluation and the
tools use nothing else of it. Adding one is a module here and a YAML file in conf/.
"""
