"""Batched augmentations: equal to the per-op reference (tests/reference_augment.py) for the
same generator, op by op for the same parameters, free of host synchronisation, and with
the intended frequencies; the bench command; evaluation logits."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import reference_augment as ref
from rable_nb.engine import augment, networks
from rable_nb.commands import cli


def varied_images(n: int, seed: int = 0) -> torch.Tensor:
    """Random images plus the corner cases: constant, low-contrast, few grey levels, 0/1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    x[0] = 0.5
    x[1] = 0.4 + 0.01 * x[1]
    x[2] = (x[2] * 4).floor() / 4
    x[3] = (x[3] > 0.5).float()
    return x


def forced(params: augment.StrongParams, op: str) -> augment.StrongParams:
    """``params`` with every slot of every image holding ``op``."""
    return augment.StrongParams(params.theta, torch.full_like(params.op, augment.OPS.index(op)),
                                params.magnitude, params.sign, params.cutout)


@pytest.mark.parametrize("name", ["weak_view", "strong_view"])
@pytest.mark.parametrize("n", [5, 300])
def test_views_equal_the_per_op_reference_for_the_same_generator(name, n):
    x = varied_images(n)
    g_new, g_ref = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
    new, old = getattr(augment, name)(x, generator=g_new), getattr(ref, name)(x, generator=g_ref)
    assert torch.equal(new, old)                                # bit for bit
    assert torch.equal(g_new.get_state(), g_ref.get_state())    # same random numbers used


@pytest.mark.parametrize("op", augment.PHOTOMETRIC)
def test_each_photometric_op_equals_the_reference_op(op):
    x = varied_images(64)
    p = forced(augment.draw_strong(x.shape, "cpu", torch.Generator().manual_seed(1)), op)
    is_op = p.op[..., None] == torch.arange(len(augment.OPS))
    for k, settings in enumerate(augment._photometric_settings(is_op, p.magnitude)):
        expected = ref.PHOTOMETRIC[op](x, p.magnitude[:, k])
        torch.testing.assert_close(augment._photometric(x, settings), expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", augment.GEOMETRIC)
def test_each_geometric_op_equals_the_reference_matrix(op, monkeypatch):
    x = varied_images(64)
    p = forced(augment.draw_strong(x.shape, "cpu", torch.Generator().manual_seed(2)), op)
    p.sign = torch.where(torch.rand(64, 3, generator=torch.Generator().manual_seed(3)) < 0.5,
                         -1.0, 1.0)
    is_op = p.op[..., None] == torch.arange(len(augment.OPS))
    got = augment._geometric_matrices(is_op, p.magnitude, p.sign)
    for k in range(3):   # the reference draws the sign inside the op: hand it the same one
        monkeypatch.setattr(ref, "_signed", lambda m, g, k=k: m * p.sign[:, k])
        assert torch.equal(got[:, k], ref.GEOMETRIC[op](p.magnitude[:, k], None))


def test_box_blur_equals_avg_pool():
    x = varied_images(8)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert torch.equal(augment._box_blur(x), blur)


def test_no_host_synchronisation(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside an augmentation")
    x = varied_images(16)
    views = {"weak": augment.weak_view, "strong": augment.strong_view}
    counts = {k: augment.count_ops(v, x, generator=torch.Generator()) for k, v in views.items()}
    reference = augment.count_ops(ref.strong_view, x, generator=torch.Generator())
    for name in ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for view in views.values():
        view(x, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert counts["weak"]["host_syncs"] == counts["strong"]["host_syncs"] == 0
    assert reference["host_syncs"] > 0 and reference["ops"] > counts["strong"]["ops"]


def test_draw_frequencies():
    n = 4000
    w = augment.draw_weak(n, "cpu", torch.Generator().manual_seed(0))
    s = augment.draw_strong((n, 3, 32, 32), "cpu", torch.Generator().manual_seed(0))

    def near(fraction, p):   # within 5 standard deviations
        return abs(float(fraction) - p) < 5 * math.sqrt(p * (1 - p) / n)
    jitter_on = w.hue != 0
    assert near(w.gray.float().mean(), 0.2) and near(jitter_on.float().mean(), 0.8)
    for theta in (w.theta, s.theta):
        assert near((theta[:, 0, 0] < 0).float().mean(), 0.5)             # horizontal flip
        area = (theta[:, 0, 0] * theta[:, 1, 1]).abs()
        assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6
    for factor in (w.brightness, w.contrast, w.saturation):
        assert torch.all(factor[~jitter_on] == 1) and factor.min() >= 0.6 and factor.max() <= 1.4
    assert w.hue.abs().max() <= 0.1 * 2 * math.pi
    counts = torch.bincount(s.op.flatten(), minlength=len(augment.OPS)).float() / s.op.numel()
    assert all(near(c, 1 / len(augment.OPS)) for c in counts)              # uniform op choice
    geometric = s.op < len(augment.GEOMETRIC)
    assert near((s.sign[geometric] < 0).float().mean(), 0.5) and torch.all(s.sign[~geometric] == 1)
    assert s.magnitude.min() >= 0 and s.magnitude.max() < 1
    side = s.cutout[:, 2]
    assert side.min() == 1 and side.max() == augment.CUTOUT_SIZE
    assert s.cutout[:, :2].min() == 0 and s.cutout[:, :2].max() == 31


def test_weak_view_greyscale_fraction():
    n = 3000
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment.weak_view(x, generator=torch.Generator().manual_seed(1))
    gray = (out[:, 0] == out[:, 1]).all(-1).all(-1) & (out[:, 1] == out[:, 2]).all(-1).all(-1)
    assert abs(gray.float().mean().item() - 0.2) < 5 * math.sqrt(0.16 / n)


def test_views_shapes_range_and_per_sample_randomness():
    x = networks.to_unit(torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)).repeat(8, 1, 1, 1)
    for view in (augment.weak_view, augment.strong_view):
        out = view(x, generator=torch.Generator().manual_seed(0))
        again = view(x, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, again)                       # seeded → reproducible
        per_image = [(out[i] - out[0]).abs().mean().item() for i in range(1, 8)]
        assert min(per_image) > 1e-3                         # every copy augmented differently


def test_cutout_is_one_clipped_square_per_image():
    p = augment.draw_strong((500, 3, 32, 32), "cpu", torch.Generator().manual_seed(0))
    mask = augment._cutout_mask(p, 32, 32)[:, 0]
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask.sum((1, 2)), rows.sum(1) * cols.sum(1))     # a rectangle ...
    assert rows.sum(1).max() <= augment.CUTOUT_SIZE and mask.flatten(1).any(1).all()
    inside = (p.cutout[:, :2] - p.cutout[:, 2:] // 2 >= 0).all(1) & (
        p.cutout[:, :2] - p.cutout[:, 2:] // 2 + p.cutout[:, 2:] <= 32).all(1)
    assert torch.equal(rows.sum(1)[inside], p.cutout[inside, 2])           # ... of the drawn side


def test_bench_augment_cli_prints_json(capsys):
    assert cli.main(["bench", "augment", "--device", "cpu", "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["what"] == "augment" and result["batch_size"] == 8
    assert result["weak_images_per_s"] > 0 and result["strong_images_per_s"] > 0
    assert result["strong_ops"] > result["weak_ops"] > 0
    assert result["weak_host_syncs"] == result["strong_host_syncs"] == 0


def test_batched_logits_equal_one_forward_and_stay_off_autograd(monkeypatch):
    torch.manual_seed(0)
    net = networks.PLLNet("tiny_cnn").train()
    x = torch.randint(0, 256, (37, 32, 32, 3), dtype=torch.uint8)
    prior = torch.log_softmax(torch.randn(10), 0)
    net.eval()
    with torch.no_grad():
        expected = net(networks.normalize(x)) - prior
    net.train()
    monkeypatch.setattr(torch.Tensor, "item", lambda *a: pytest.fail("host synchronisation"))
    for batch in (None, 10, 37):
        out = networks.batched_logits(net, x.numpy(), prior, batch)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not out.requires_grad and net.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["weak_view", "strong_view"])
def test_views_capture_in_a_cuda_graph_and_replay_like_eager(name):
    view = getattr(augment, name)
    x = torch.rand(64, 3, 32, 32, device="cuda")
    gen = torch.Generator(device="cuda")
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):       # warm-up (makes the cached constants) before capture
        view(x, generator=gen)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = view(x, generator=gen)
    gen.manual_seed(5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(out, first)                       # fresh random numbers per replay
    gen.manual_seed(5)
    torch.testing.assert_close(first, view(x, generator=gen))
