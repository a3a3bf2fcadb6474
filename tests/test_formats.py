"""flystage.formats: the built-in table, registering a format, and a toy format registered here
only, shown to work end to end (organise, reading and preprocessing, the serve codec and
handler, the client, `flystage predict`) without any other module knowing of it."""

from __future__ import annotations

import csv
import struct
import subprocess
import sys
from http import HTTPStatus
from pathlib import Path

import cv2
import numpy as np
import pytest

from artefact_helpers import embryo, make_artefact, tiny_config
from flystage import cli, formats
from flystage.formats import ImageFormat
from flystage.image_checks import ImageError, Limits, check_size
from flystage.imaging import load, preprocess
from flystage.organise import iter_images, organise
from flystage.organise_error import OrganiseError
from flystage.reading import read_image
from flystage.serving import client, codec
from imaging_helpers import encode, tiff_bytes
from serving_helpers import handler_service, invoke

# ---- the built-in table ----------------------------------------------------------------------


def test_builtin_formats_in_message_order():
    assert [f.name for f in formats.table()] == ["tiff", "png", "bmp", "jpeg"]
    assert formats.supported() == "TIFF, PNG, BMP or JPEG"
    assert formats.mime_types() == {"image/tiff", "image/png", "image/bmp", "image/jpeg"}


def test_sniff_recognises_the_content() -> None:
    img = np.zeros((8, 8), np.uint8)
    assert formats.sniff(tiff_bytes(img)).name == "tiff"
    assert formats.sniff(tiff_bytes(img, bigtiff=True)).name == "tiff"
    assert formats.sniff(b"MM\x00*rest").name == "tiff"  # big-endian
    for ext, kind in ((".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp")):
        assert formats.sniff(encode(img, ext)[: formats.HEAD_BYTES]).name == kind
    assert formats.sniff(b"GIF89a") is None and formats.sniff(b"") is None


def test_lookups_by_suffix_and_mime_type():
    assert formats.by_suffix(".TIF").name == "tiff" and formats.by_suffix(".tiff").name == "tiff"
    assert formats.by_suffix(".jpeg").name == "jpeg" and formats.by_suffix(".JPG").name == "jpeg"
    assert formats.by_suffix(".txt") is None and formats.by_suffix("") is None
    assert formats.by_mime_type("Image/PNG").name == "png"
    assert formats.by_mime_type("application/octet-stream") is None
    assert formats.by_suffix(".bmp").mime_type == "image/bmp"


def test_unknown_content_is_described():
    assert "GIF" in formats.describe_unknown(b"GIF89a")
    assert "text file" in formats.describe_unknown(b"stage,label\n")
    assert "not a recognised" in formats.describe_unknown(b"\x00\x01\x02")


def test_the_table_loads_no_image_stack():
    # organise, the control plane and the client consult the table: numpy and OpenCV stay out.
    code = (
        "import sys, flystage.formats, flystage.serving.client\n"
        "assert flystage.serving.client.content_type(b'\\x89PNG\\r\\n\\x1a\\nx') == 'image/png'\n"
        "assert not {'numpy', 'cv2', 'tifffile'} & set(sys.modules), sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---- a toy format, registered in this file only ----------------------------------------------

TOY_MAGIC = b"FLYTOY\x00\x01"


def toy_bytes(image: np.ndarray) -> bytes:
    """A FLYTOY file: the magic, width and height (uint16 little-endian), uint8 pixels."""
    height, width = image.shape
    return TOY_MAGIC + struct.pack("<HH", width, height) + image.astype(np.uint8).tobytes()


def decode_toy(source: bytes, page: int, label: str, limits: Limits) -> np.ndarray:
    width, height = struct.unpack_from("<HH", source, len(TOY_MAGIC))
    check_size(height, width, label, limits, height * width)
    pixels = np.frombuffer(source, np.uint8, offset=len(TOY_MAGIC) + 4)
    if pixels.size < height * width:
        raise ImageError(f"{label}: the FLYTOY file is truncated; copy it again from its source")
    return pixels[: height * width].reshape(height, width)


TOY = ImageFormat("flytoy", (TOY_MAGIC,), (".flytoy",), ("image/x-flytoy",), decode_toy)


@pytest.fixture
def toy():
    """The toy format in the table for one test; the table as it was afterwards."""
    before = formats.table()
    formats.register(TOY)
    yield TOY
    formats.unregister(TOY.name)
    assert formats.table() == before


def toy_image(seed: int) -> np.ndarray:
    return embryo(seed=seed, dtype=np.uint8)


def test_register_adds_to_every_lookup_and_unregister_removes(toy):
    body = toy_bytes(toy_image(0))
    assert formats.sniff(body[: formats.HEAD_BYTES]) is toy
    assert formats.by_suffix(".FLYTOY") is toy and formats.by_mime_type("image/x-flytoy") is toy
    assert formats.supported() == "TIFF, PNG, BMP, JPEG or FLYTOY"
    assert formats.suffix_text() == ".tif/.tiff/.png/.bmp/.jpg/.jpeg/.flytoy"
    assert "image/x-flytoy" in formats.mime_types()


def other_format(**changes) -> ImageFormat:
    """A format unlike any other, but for ``changes`` to its fields."""
    fields = {
        "name": "other",
        "magic": (b"OTHER",),
        "suffixes": (".other",),
        "mime_types": ("image/x-other",),
        "decode": decode_toy,
    }
    return ImageFormat(**{**fields, **changes})


def test_register_refuses_a_second_claim_on_a_name_magic_suffix_or_type(toy):
    for clash in (
        other_format(name="flytoy"),
        other_format(magic=(b"FLYTOY",)),  # starts every toy file
        other_format(magic=(b"II*\x00more",)),  # starts with TIFF's magic
        other_format(suffixes=(".tif",)),
        other_format(mime_types=("image/x-flytoy",)),
    ):
        with pytest.raises(ValueError, match="already"):
            formats.register(clash)
    assert formats.table()[-1] is toy


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "Other"},
        {"magic": ()},
        {"magic": (b"x" * 17,)},
        {"suffixes": ("other",)},
        {"mime_types": ("other",)},
    ],
)
def test_a_malformed_format_is_refused(changes):
    with pytest.raises(ValueError):
        other_format(**changes)


def test_unregistering_an_unknown_format_is_a_key_error():
    with pytest.raises(KeyError, match="toy"):
        formats.unregister("toy")


def test_toy_files_are_unknown_until_registered(tmp_path):
    (tmp_path / "a.flytoy").write_bytes(toy_bytes(toy_image(0)))
    paths, ignored = iter_images([tmp_path])
    assert paths == [] and ignored == {"not an image (.flytoy)": 1}
    with pytest.raises(ImageError, match="save it as TIFF, PNG, BMP or JPEG"):
        read_image(tmp_path / "a.flytoy")
    with pytest.raises(codec.RequestError) as caught:
        codec.decode_request(b"FLYTOY", "image/x-flytoy")
    assert caught.value.status_code == HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    assert client.content_type(toy_bytes(toy_image(0))) == "application/octet-stream"


def test_organise_walks_toy_files(toy, tmp_path):
    for name in ("11-12/a.flytoy", "13-16/b.FLYTOY"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(toy_bytes(toy_image(1)))
    (tmp_path / "notes.txt").write_text("stray")
    paths, ignored = iter_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "11-12/a.flytoy",
        "13-16/b.FLYTOY",
    ]
    assert ignored == {"not an image (.txt)": 1}


def test_reading_and_preprocessing_a_toy_file(toy, tmp_path):
    image = toy_image(2)
    path = tmp_path / "embryo.flytoy"
    path.write_bytes(toy_bytes(image))
    np.testing.assert_array_equal(read_image(path), image)
    np.testing.assert_array_equal(read_image(path.read_bytes()), image)
    config = tiny_config()
    np.testing.assert_array_equal(load(path, config), preprocess(image, config))
    with pytest.raises(ImageError, match="a FLYTOY file has only one page"):
        read_image(path, page=1)
    with pytest.raises(ImageError, match="upload: the FLYTOY file is truncated"):
        read_image(path.read_bytes()[:-5], name="upload")
    with pytest.raises(ImageError, match="more than the limit"):
        read_image(path, max_pixels=100)
    with pytest.raises(ImageError, match="save it as TIFF, PNG, BMP, JPEG or FLYTOY"):
        read_image(b"GIF89a" + bytes(20))


def test_the_client_sends_the_toy_type_and_the_codec_accepts_it(toy):
    body = toy_bytes(toy_image(3))
    assert client.content_type(body) == "image/x-flytoy"
    request = codec.decode_request(body, "Image/X-FlyToy; charset=binary")
    assert request.images == [body]
    assert "image/x-flytoy" in codec.raw_types()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    make_artefact(d)
    return d


def png_twin(image: np.ndarray) -> bytes:
    """The same pixels as a PNG: the reference a toy file's answer must equal."""
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_the_serve_handler_answers_a_toy_request_like_its_png_twin(toy, model_dir):
    service = handler_service(model_dir)
    image = toy_image(4)
    status, answer = invoke(service, toy_bytes(image), "image/x-flytoy")
    assert status == 200, answer
    png_status, png_answer = invoke(service, png_twin(image), "image/png")
    assert png_status == 200 and answer["predictions"] == png_answer["predictions"]


def test_flystage_predict_on_a_folder_of_toy_files(toy, model_dir, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for seed in range(3):
        (folder / f"embryo{seed}.flytoy").write_bytes(toy_bytes(toy_image(seed)))
        (folder / f"embryo{seed}.png").write_bytes(png_twin(toy_image(seed)))
    out = tmp_path / "preds.csv"
    assert cli.main(["predict", str(folder), "--model", str(model_dir), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = {row.pop("file"): row for row in csv.DictReader(f)}
    assert len(rows) == 6
    for seed in range(3):
        toy_row, png_row = rows[f"embryo{seed}.flytoy"], rows[f"embryo{seed}.png"]
        assert toy_row["error"] == "" and toy_row == png_row


def test_a_folder_without_images_names_every_registered_suffix(toy, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("stage 9")
    with pytest.raises(OrganiseError, match=r"no images \(\.tif/.*/\.jpeg/\.flytoy\) under"):
        organise([tmp_path])
