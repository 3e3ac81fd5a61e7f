"""Dify's relative `/files/…` links (its FILES_URL is empty): a 400 that says what to set, known to `explain`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.test_media_fetch import PNG
from vlmbridge.catalogue import classify, explain
from vlmbridge.cli.app import main
from vlmbridge.errors import ImageInputError
from vlmbridge.media.sources import RELATIVE_FILE_URL_MESSAGE, ImageSources, SourcePolicy

PARAM = "messages[0].content[0].image_url"
DIFY_URL = (
    "/files/3f0c2a1e-8d4b-4c55-9f7e-2b1d0c9e6a11/file-preview?timestamp=1718000000&nonce=9a8b7c6d5e4f3a2b"
    "&sign=Zm9vYmFyYmF6cXV4"
)


def refused(url: str, policy: SourcePolicy | None = None) -> ImageInputError:
    async def go() -> None:
        async with ImageSources(policy or SourcePolicy()) as sources:
            await sources.load(url, param=PARAM)

    with pytest.raises(ImageInputError) as info:
        asyncio.run(go())
    return info.value


@pytest.mark.parametrize(
    "url",
    [DIFY_URL, "/files/tools/5d7e9c1a.png?timestamp=1&nonce=2&sign=3", "/files/3f0c/image-preview",
     "files/3f0c/file-preview?sign=abc", "/some/path/cat.png?x=1"],
)  # fmt: skip
def test_relative_links_are_a_400_that_names_files_url(url: str, tmp_path: Path) -> None:
    for policy in (SourcePolicy(), SourcePolicy(allow_local_dirs=(tmp_path,))):
        err = refused(url, policy)
        assert err.code == "relative_file_url" and err.param == PARAM
        assert "FILES_URL" in err.message and "http://api:5001" in err.message and "Dify" in err.message
        assert "sign=" not in err.message and "nonce" not in err.message  # the signed link is not echoed
        assert len(err.message) < 300 and "\n" not in err.message


def test_other_absolute_paths_stay_local_files(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    policy = SourcePolicy(allow_local_dirs=(tmp_path,), allow_remote=False)

    async def load(url: str) -> tuple[int, int]:
        async with ImageSources(policy) as sources:
            return (await sources.load(url, param=PARAM)).size

    assert asyncio.run(load(str(tmp_path / "cat.png"))) == (8, 6)
    assert refused("/etc/passwd", policy).code == "image_url_refused"
    assert refused("/srv/photos/cat.png").code == "image_url_refused"  # local files off: as before
    assert refused("//example.com/cat.png?x=1").code == "invalid_image_url"  # protocol-relative: not a Dify link


def test_an_allowed_local_dir_named_files_still_reads_files() -> None:
    files = Path("/files")
    sources = ImageSources(SourcePolicy(allow_local_dirs=(files,), allow_remote=False))
    assert not sources._is_relative_file_url("/files/cat.png")
    assert sources._is_relative_file_url("/files/cat.png?sign=1")
    asyncio.run(sources.aclose())


def test_explain_knows_the_message() -> None:
    body = json.dumps(
        {"error": {"message": RELATIVE_FILE_URL_MESSAGE, "type": "invalid_request_error", "param": PARAM,
                   "code": "relative_file_url"}}
    )  # fmt: skip
    for text in (RELATIVE_FILE_URL_MESSAGE, f"openai.BadRequestError: Error code: 400 - {body}", "relative_file_url",
                 f"requests.exceptions.MissingSchema: Invalid URL '{DIFY_URL}': No scheme supplied. Perhaps you meant "
                 f"https://{DIFY_URL}?"):  # fmt: skip
        entry = classify(text)
        assert entry is not None and entry.code == "dify-files-url-empty", text
        assert "FILES_URL=http://api:5001" in entry.fix and entry.doctor_check is None
        assert [m.entry.code for m in explain(text)] == ["dify-files-url-empty"]  # nothing else claims it


def test_explain_cli_prints_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["explain", "--json", RELATIVE_FILE_URL_MESSAGE])
    except SystemExit as exc:
        code = exc.code
    data = json.loads(capsys.readouterr().out)
    assert code in (0, None) and data["known"] is True
    assert data["matches"][0]["code"] == "dify-files-url-empty" and "FILES_URL" in data["matches"][0]["fix"]


def test_the_dify_guide_says_it_up_front() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "dify.md").read_text()
    note = guide.index("relative_file_url")
    assert note < guide.index("## 1.") and "FILES_URL=http://api:5001" in guide[note : note + 600]
