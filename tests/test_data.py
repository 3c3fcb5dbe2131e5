"""DATA: every image is checked when the folder is opened; the root is recorded resolved (resume fingerprints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_image_folder

from easier_export.core.errors import UserError
from easier_export.load.data import image_problem, open_image_folder
from easier_export.loop.state import data_id


def test_relative_and_absolute_data_paths_fingerprint_alike(tmp_path, monkeypatch) -> None:
    make_image_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    ids = [data_id(open_image_folder(root).loaders((3, 16, 16), (0.5,) * 3, (0.5,) * 3, 4, 0).train)
           for root in ("data", tmp_path / "data", "./data/../data")]
    assert ids[0] == ids[1] == ids[2] and ids[0]["root"] == str((tmp_path / "data" / "train").resolve())


def test_bad_images_stop_the_run_or_are_skipped_and_counted(tmp_path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=2)
    png = next((root / "val" / "class1").glob("*.png"))
    png.write_bytes(png.read_bytes()[:-20])  # IEND chunk gone
    (root / "train" / "class0" / "notes.jpg").write_text("not an image")
    with pytest.raises(UserError, match=r"notes\.jpg: not a readable image.*--skip-bad-images"):
        open_image_folder(root)
    folder = open_image_folder(root, skip_bad=True)
    assert sorted(Path(p).name for p in folder.skipped) == sorted(["notes.jpg", png.name])
    assert len(folder.train.samples) == 6 and len(folder.val.samples) == 5 and len(folder.val.targets) == 5
    assert folder.common_size == (16, 16)
    loaders = folder.loaders((3, 16, 16), (0.5,) * 3, (0.5,) * 3, 2, 0)
    assert loaders.skipped == folder.skipped and sum(len(y) for _, y in loaders.val) == 5


def test_crop_pct_and_interpolation_reach_the_transforms(tmp_path) -> None:
    folder = open_image_folder(make_image_folder(tmp_path / "data", size=40))
    folder.loaders((3, 224, 224), (0.5,) * 3, (0.5,) * 3, crop_pct=0.95, interpolation="bicubic")
    resize = folder.val.transform.transforms[0]
    assert resize.size == round(224 / 0.95) and resize.interpolation.value == "bicubic"
    folder.loaders((3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    assert folder.val.transform.transforms[0].size == 256  # timm's default crop_pct 0.875, bilinear


def test_images_of_the_input_size_are_used_as_they_are_unless_a_crop_is_asked(tmp_path) -> None:
    """A pretrained config's crop would zoom 32x32 CIFAR images to 36 and back: the model would be finetuned and
    judged on a view its users never feed it."""
    from torchvision import transforms

    folder = open_image_folder(make_image_folder(tmp_path / "data", size=32))
    loaders = folder.loaders((3, 32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=0.9)
    assert not any(isinstance(t, transforms.Resize) for t in folder.val.transform.transforms)
    assert loaders.preprocessing.to_dict() == {"resize": None, "interpolation": None, "center_crop": None,
                                               "mean": [0.5] * 3, "std": [0.5] * 3}
    assert "used as they are (32x32)" in loaders.preprocessing.describe()
    asked = folder.loaders((3, 32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=0.9, crop_native=True)
    assert folder.val.transform.transforms[0].size == round(32 / 0.9)
    assert asked.preprocessing.to_dict()["center_crop"] == [32, 32]


def test_image_problem_reads_headers_and_ends(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "x.jpg"
    Image.fromarray(torch.randint(0, 255, (32, 24, 3), dtype=torch.uint8).numpy()).save(path)
    assert image_problem(str(path)) == ("", (24, 32))
    path.write_bytes(path.read_bytes() + b"\0\0\n")  # padding after the end marker is fine
    assert image_problem(str(path))[0] == ""
    path.write_bytes(path.read_bytes()[:-300])
    assert image_problem(str(path)) == ("truncated JPEG (no end marker)", None)


@pytest.mark.slow
def test_checking_cifar10_decodes_no_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers and end markers only: that is what keeps checking 60k images to seconds."""
    from PIL import ImageFile

    root = SHARED / "datasets" / "cifar10-jpeg"
    if not root.is_dir():
        pytest.skip("needs ../shared")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image))
    folder = open_image_folder(root, 10)
    assert not decoded and folder.common_size == (32, 32) and not folder.skipped


def test_a_clearly_better_normalization_stops_the_run(tmp_path, monkeypatch) -> None:
    """A model trained on raw pixels, configured with ImageNet mean/std: say so in one line before finetuning
    "recovers" it to the wrong normalization; a difference within the margin says nothing."""
    import pytest
    from torch import nn

    from easier_export import normalization
    from easier_export.core.errors import UserError
    from easier_export.load.models import LoadedModel

    folder = open_image_folder(make_image_folder(tmp_path / "data", size=16))
    loaded = LoadedModel(nn.Identity(), "raw-pixel model", input_size=(3, 16, 16))

    def scored(top1: float) -> dict:  # of 100 images, the first ones right
        return {"top1": top1, "correct": (torch.arange(100) < top1).double()}

    def evaluate(model, batches, device) -> dict:  # right only on pixels in [0, 1]
        return scored(90.0 if batches[0][0].min() >= 0 else 20.0)

    monkeypatch.setattr(normalization, "evaluate_metrics", evaluate)
    with pytest.raises(UserError, match=r"scores 20\.0% on val with its configured mean/std but 90\.0% with none "
                                        r"\(0 and 1\) normalization: .* --mean 0,0,0 --std 1,1,1$"):
        normalization.check_normalization(loaded, folder, 4, 0)
    monkeypatch.setattr(normalization, "evaluate_metrics", lambda model, batches, device: scored(50.0))
    normalization.check_normalization(loaded, folder, 4, 0)

    def few(model, batches, device) -> dict:  # 2 of 3 images right against 0 of 3: beyond the margin, not the noise
        right = batches[0][0].min() >= 0
        return {"top1": 66.7 if right else 0.0, "correct": torch.tensor([1.0, 1.0, 0.0] if right else [0.0] * 3)}

    monkeypatch.setattr(normalization, "evaluate_metrics", few)
    normalization.check_normalization(loaded, folder, 4, 0)
