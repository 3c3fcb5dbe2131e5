import pytest
import torch

from easier_export.core.errors import UserError
from easier_export.load.models import build_arch, load_model
from easier_export.trace.sites import find_call_sites


def test_state_dict_with_module_prefix_nested_under_state_dict(tmp_path):
    net = build_arch("cifar_resnet20")
    path = tmp_path / "ckpt.th"
    torch.save({"best_prec1": 91.0, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    for loaded in (load_model(str(path), arch="cifar_resnet20"), load_model("cifar_resnet20", weights=path)):
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(loaded.model(x), net.eval()(x))
        assert loaded.input_size == (3, 32, 32)


def test_state_dict_needs_arch(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_arch("demo_cnn").state_dict(), path)
    with pytest.raises(UserError, match="--arch"):
        load_model(str(path))


def test_mismatched_state_dict_lists_keys(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_arch("demo_cnn").state_dict(), path)
    with pytest.raises(UserError, match=r"missing \d+ keys \(conv1\.weight.*unexpected \d+ keys \(stem"):
        load_model(str(path), arch="cifar_resnet20")


def test_export_archive_loads_with_dynamic_batch_and_has_call_sites(tmp_path):
    from easier_export.trace.tracing import trace

    net = build_arch("demo_cnn").eval()
    x = torch.randn(2, 1, 16, 16)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), path)
    loaded = load_model(str(path))
    assert loaded.input_size == (1, 16, 16)
    for batch in (1, 5):
        torch.testing.assert_close(loaded.model(x[:1].expand(batch, -1, -1, -1)), net(x[:1].expand(batch, -1, -1, -1)))
    assert len(find_call_sites(trace(loaded.model))) == 6


def test_export_archive_with_static_batch_is_refused_clearly(tmp_path):
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(build_arch("demo_cnn").eval(), (torch.randn(2, 1, 16, 16),)), path)
    with pytest.raises(UserError, match="static batch size"):
        load_model(str(path))


def test_wrong_head_size_without_num_classes_is_a_user_error(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_arch("cifar_resnet20", num_classes=3).state_dict(), path)
    with pytest.raises(UserError, match=r"differ in shape .*linear\.weight.*--num-classes"):
        load_model(str(path), arch="cifar_resnet20")


def test_empty_file_is_a_user_error(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="cannot read"):
        load_model(str(path))


def test_pickle_refused_then_accepted(tmp_path):
    net = build_arch("demo_cnn").eval()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    x = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(loaded.model(x), net(x))


@pytest.mark.parametrize(("name", "hint"), [("timm:resnet181", "resnet18"), ("torchvision:resnet19", "resnet18"),
                                            ("cifar_resnet21", "cifar_resnet20")])
def test_unknown_names_suggest_close_ones(name, hint):
    with pytest.raises(UserError, match=f"Did you mean: .*{hint}"):
        load_model(name)


def test_num_classes_reheads_and_random_init_is_noted():
    loaded = load_model("torchvision:resnet18", num_classes=7)
    assert loaded.num_classes == 7
    assert any("random initialisation" in n for n in loaded.notes)


def test_input_size_reaches_fixed_size_timm_models():
    swin = load_model("timm:swin_tiny_patch4_window7_224", num_classes=10, img_size=32).model
    assert swin(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert load_model("timm:resnet18", num_classes=10, img_size=32).model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(("content", "trust", "message"), [
    (b"hello world\n", False, "is not a PyTorch file"),
    (b"\x80\x02garbage" * 50, True, "cannot read"),
    (b"\x80\x02garbage" * 50, False, "cannot read"),
    (b"PK\x03\x04" + bytes(range(256)) * 4, False, "cannot read"),
])
def test_files_that_are_not_models_say_what_they_are_not(tmp_path, content, trust, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        load_model(str(path), trust_pickle=trust)
    assert "--trust-pickle" not in str(info.value)


def test_num_classes_reheads_named_arch_and_state_dict(tmp_path):
    net = build_arch("cifar_resnet20", num_classes=10)
    path = tmp_path / "sd.pt"
    torch.save(net.state_dict(), path)
    for loaded in (load_model("cifar_resnet20", num_classes=5, weights=path),
                   load_model(str(path), arch="cifar_resnet20", num_classes=5)):
        assert loaded.num_classes == 5
        assert any("10-class head" in n and "5-class" in n for n in loaded.notes)
        torch.testing.assert_close(loaded.model.conv1.weight, net.conv1.weight)  # the body is loaded
    torch.save({**net.state_dict(), "conv1.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(UserError, match=r"conv1\.weight .*only the classifier head may differ"):
        load_model(str(path), arch="cifar_resnet20", num_classes=5)


def test_input_size_forms():
    assert load_model("demo_cnn", img_size=12).input_size == (1, 12, 12)
    assert load_model("cifar_resnet20", img_size=(24, 16)).input_size == (3, 24, 16)
    assert load_model("cifar_resnet20", img_size=(1, 8, 8)).input_size == (1, 8, 8)
    assert load_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=(32, 48)).model(
        torch.randn(1, 3, 32, 48)).shape == (1, 3)
    assert not load_model("torchvision:resnet18").size_declared
    assert load_model("cifar_resnet20").size_declared
