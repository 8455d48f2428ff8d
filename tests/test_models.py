import re

import pytest
import torch
from torchvision import models as tv

from cnnfast import models
from cnnfast.analysis import analyze

TORCHVISION_NAMES = [name for name in models.ARCHITECTURES if name != "zfnet"]


def _meta(build, **kwargs):
    with torch.device("meta"):
        return build(**kwargs)


def _torchvision(name):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return _meta(getattr(tv, name), weights=None, **kwargs)


def test_architectures_in_lecture_order():
    assert list(models.ARCHITECTURES) == [
        "alexnet", "zfnet", "vgg16", "vgg19", "vgg16_bn", "vgg19_bn", "googlenet",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    ]
    assert models.DEFAULT_INPUT_SIZE == {name: 227 if name == "alexnet" else 224 for name in models.ARCHITECTURES}


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_builds_on_meta_and_classifies(name):
    model = _meta(models.get_model, name=name).eval()
    assert all(p.is_meta for p in model.parameters())
    size = models.DEFAULT_INPUT_SIZE[name]
    assert model(torch.empty(2, 3, size, size, device="meta")).shape == (2, 1000)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_state_dict_and_param_count_match_torchvision(name):
    ours, theirs = _meta(models.ARCHITECTURES[name]), _torchvision(name)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_googlenet_is_the_inference_path():
    model = _meta(models.googlenet)
    assert model.aux1 is None and model.aux2 is None
    assert not model.transform_input


def test_torchvisions_googlenet_weights_load_into_the_builder_with_their_settings():
    """torchvision's GoogLeNet weights hold the auxiliary heads and expect its input transform:
    googlenet(aux_logits=True, transform_input=True) takes its state_dict strictly."""
    theirs = tv.googlenet(weights=None, aux_logits=True, init_weights=False)
    ours = models.googlenet(aux_logits=True, transform_input=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        models.googlenet().load_state_dict(theirs.state_dict(), strict=True)


def test_num_classes_and_kwargs_reach_the_model():
    assert _meta(models.get_model, name="resnet18", num_classes=10).fc.out_features == 10
    assert _meta(models.zfnet, num_classes=7).classifier[-1].out_features == 7
    assert _meta(models.vgg16, dropout=0.1).classifier[2].p == 0.1


def test_zfnet_keys_follow_torchvision_alexnet_layout():
    zf, alex = _meta(models.zfnet), _meta(models.alexnet)
    assert list(zf.state_dict()) == list(alex.state_dict())


def test_zfnet_param_count_from_layer_formulas():
    convs = [(3, 96, 7), (96, 256, 5), (256, 512, 3), (512, 1024, 3), (1024, 512, 3)]
    linears = [(512 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]
    expected = sum(c * k * r * r + k for c, k, r in convs) + sum(i * o + o for i, o in linears)
    assert sum(p.numel() for p in _meta(models.zfnet).parameters()) == expected


def _docstring_table(doc):
    """(layer name, output shape) rows of the table in ZFNet's docstring."""
    rows = {}
    for line in doc.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if re.fullmatch(r"features\.\d+|avgpool|classifier\.\d+", cells[0]):
            rows[cells[0]] = [1000 if size == "num_classes" else int(size) for size in cells[-1].split(" x ")]
    return rows


def test_zfnet_layer_sizes_match_its_docstring():
    table = _docstring_table(models.ZFNet.__doc__)
    assert len(table) == 12
    layers = {layer.name: layer.output_shape for layer in analyze(_meta(models.zfnet), 224).layers}
    assert {name: layers[name] for name in table} == table


def test_zfnet_runs_for_real_on_cpu():
    model = models.zfnet(num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as error:
        models.get_model("lenet")
    assert "lenet" in str(error.value)
    for name in models.ARCHITECTURES:
        assert name in str(error.value)


def test_the_first_preactivation_block_takes_the_stems_activation():
    """He et al. 2016: after the stem's conv, BN and ReLU, the first unit has no BN -> ReLU of its own."""
    model = _meta(models.preact_resnet18)
    assert model.layer1[0].bn1 is None
    assert all(block.bn1 is not None for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
               for block in stage if block is not model.layer1[0])


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "resnet152"])
def test_the_resnet_v1_5_notes_give_the_counted_macs(name):
    from cnnfast.analysis import analyze_arch

    gmacs = analyze_arch(name).totals["macs"] / 1e9
    assert f"{gmacs:.2f} GMACs at 224x224 against the paper's" in models.ARCHITECTURE_NOTES[name]


def test_the_googlenet_note_gives_the_counts_with_and_without_the_papers_5x5_convs():
    from torchvision.models.googlenet import BasicConv2d, Inception

    from cnnfast.analysis import analyze

    model = _meta(models.googlenet)
    counted = analyze(model, 224).totals
    for module in model.modules():
        if isinstance(module, Inception):  # branch3: the 1x1 reduction, then the 3x3 the paper has as 5x5
            reduce, conv = module.branch3
            module.branch3[1] = BasicConv2d(reduce.conv.out_channels, conv.conv.out_channels, kernel_size=5, padding=2)
    with_5x5 = analyze(model, 224).totals
    figures = [counted["macs"] / 1e9, counted["params"] / 1e6, with_5x5["macs"] / 1e9, with_5x5["params"] / 1e6]
    assert ("{:.2f} GMACs and {:.2f} M parameters, where 5x5 convs there would give {:.2f} and {:.2f}".format(*figures)
            in models.ARCHITECTURE_NOTES["googlenet"])
