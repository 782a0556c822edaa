"""Find, download and verify Mikolov's preprocessed Penn Treebank."""

import hashlib
import logging
import shutil
import tarfile
from pathlib import Path

from lm.data.download import fetch, keep, scratch_folder
from lm.errors import UserError

log = logging.getLogger(__name__)

URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
SPLITS = ("train", "valid", "test")
# The canonical files; numbers on other files are not comparable with the papers.
MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}


def ptb_files(data_dir: Path) -> dict[str, Path]:
    return {split: Path(data_dir) / f"ptb.{split}.txt" for split in SPLITS}


def ensure_ptb(data_dir: Path, url: str = URL) -> dict[str, Path]:
    """Return the three PTB files in `data_dir`, downloading only those that are missing.

    Downloaded files must match the canonical MD5 sums; files the user put there only draw a
    warning when they differ, so a subset or a variant of PTB can still be trained on.
    """
    files = ptb_files(data_dir)
    missing = [split for split, path in files.items() if not path.exists()]
    for split, path in files.items():
        if split not in missing and _md5(path) != MD5[split]:
            log.warning(
                "%s differs from the canonical PTB file (MD5 %s); its perplexities are not "
                "comparable with the published ones.",
                path,
                MD5[split],
            )
    if missing:
        _download(missing, files, url)
    return files


def _download(splits: list[str], files: dict[str, Path], url: str) -> None:
    data_dir = files[splits[0]].parent
    wanted = ", ".join(files[split].name for split in splits)
    fix = "Set data.dir=PATH or PTB_DIR to a folder holding ptb.{train,valid,test}.txt."
    with scratch_folder(data_dir, f"PTB files missing ({wanted})", fix) as scratch:
        log.info("Downloading %s from %s into %s", wanted, url, data_dir)
        archive = scratch / "simple-examples.tgz"
        try:
            fetch(url, archive)
            members = _extract(archive, splits, files, scratch)
        except (OSError, tarfile.TarError) as error:
            raise UserError(
                f"PTB files missing in {data_dir} ({wanted}) and the download from {url} failed "
                f"({error}). Put ptb.train.txt, ptb.valid.txt and ptb.test.txt from Mikolov's "
                "simple-examples.tgz in that folder, or point data.dir=PATH (or PTB_DIR) at them."
            ) from error
        for split, extracted in members.items():
            if _md5(extracted) != MD5[split]:
                raise UserError(
                    f"Downloaded {files[split].name} from {url} fails its MD5 check (expected "
                    f"{MD5[split]}); it was not kept. Retry, or put the canonical files in {data_dir}."
                )
        for path in keep(members, files):
            log.warning("%s appeared during the download; kept it, not the downloaded one.", path)


def _extract(archive: Path, splits: list[str], files: dict[str, Path], into: Path) -> dict[str, Path]:
    """Pull only the requested ptb.*.txt members out of the archive (no path from it is trusted)."""
    extracted = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            for split in splits:
                if member.isfile() and member.name.endswith(f"/data/{files[split].name}"):
                    target = into / files[split].name
                    with tar.extractfile(member) as source, open(target, "wb") as f:
                        shutil.copyfileobj(source, f)
                    extracted[split] = target
    absent = [files[split].name for split in splits if split not in extracted]
    if absent:
        raise tarfile.TarError(f"the archive has no simple-examples/data/{', '.join(absent)}")
    return extracted


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()
