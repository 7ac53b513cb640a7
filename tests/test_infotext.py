import io

from PIL import Image

from sdserve.engine import infotext
from sdserve.images import decode_image, encode_png, read_infotext

PARAMS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1,
    "Size": "64x64", "Model hash": "0123456789", "Model": "demo", "Lora hashes": "name: abc123",
    "Denoising strength": None,
}


def test_build_matches_a1111_format():
    text = infotext.build("a red circle", "blurry, low quality", PARAMS)
    assert text == (
        "a red circle\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, "
        'Model hash: 0123456789, Model: demo, Lora hashes: "name: abc123"'
    )


def test_no_negative_prompt_line_when_empty():
    assert "Negative prompt" not in infotext.build("x", "", PARAMS)


def test_round_trip():
    text = infotext.build("line one\nline two, with comma", "neg", PARAMS)
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == "line one\nline two, with comma"
    assert parsed["Negative prompt"] == "neg"
    assert parsed["Steps"] == "20"
    assert parsed["CFG scale"] == "7"
    assert parsed["Lora hashes"] == "name: abc123"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("64", "64") and "Size" not in parsed  # A1111 splits WxH
    assert "Denoising strength" not in parsed
    assert parsed["Schedule type"] == "Karras" and parsed["Clip skip"] == "1"  # given, and A1111's default


def test_prompt_only_text_has_no_params_but_a1111s_defaults():
    parsed = infotext.parse("just a prompt")
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Clip skip"], parsed["Hires schedule type"]) == \
        ("just a prompt", "", "1", "Use same scheduler")
    assert parsed["Refiner switch by sampling steps"] is False and parsed["FP8 weight"] == "Disable"
    assert "Emphasis" not in parsed and "Steps" not in parsed
    assert infotext.parse("a (weighted:1.2) word")["Emphasis"] == "Original"  # A1111 adds it where weights are
    assert "Emphasis" not in infotext.parse("a (plain:1.0) BREAK word")


def test_every_size_splits_and_the_defaults_are_a1111s():
    parsed = infotext.parse("p\nSteps: 4, Seed: 1, Size: 64x48, Hires resize: 128x96, Seed resize from: 32x32, "
                            "Clip skip: 2, Hires sampler: Euler")
    assert {k: parsed[k] for k in ("Size-1", "Size-2", "Hires resize-1", "Hires resize-2", "Seed resize from-1",
                                   "Seed resize from-2")} == {"Size-1": "64", "Size-2": "48", "Hires resize-1": "128",
                                                              "Hires resize-2": "96", "Seed resize from-1": "32",
                                                              "Seed resize from-2": "32"}
    assert parsed["Clip skip"] == "2" and parsed["Hires sampler"] == "Euler" and parsed["RNG"] == "GPU"
    assert parsed["Hires checkpoint"] == "Use same checkpoint" and parsed["Masked area padding"] == 32


def test_infotext_read_back_from_png():
    text = infotext.build("a red circle", "", PARAMS)
    png = encode_png(Image.new("RGB", (8, 8), "red"), text)
    assert read_infotext(Image.open(io.BytesIO(png))) == text
    # ...and through the base64 path clients use.
    import base64

    assert read_infotext(decode_image(base64.b64encode(png).decode())) == text
