"""Benchmarks and reports, run as python -m lm.tools.<name>; nothing else imports them."""
