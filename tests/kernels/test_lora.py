"""FastLoraLinear against peft's own LoRA Linear: peft builds it through its custom-module
dispatch; its fast path gives the same loss and adapter gradients, layers that read one input
share their work, and the fast path is off again after fast_lora_in."""
from __future__ import annotations

import contextlib
import pickle

import pytest
import torch
from kernel_inputs import adapter_grads, alpaca_batch, lora_model, randomize_lora_b
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear

from nb_finetune import kernels
from nb_finetune.kernels import compat
from nb_finetune.kernels.dropout import FastDropout, fast_dropout_in
from nb_finetune.kernels.lora import FastLoraLinear, dispatch_fast_lora, fast_lora_in
from nb_finetune.kernels.weights import frozen_weights_in


@pytest.fixture(scope="module")
def batch(shared_data, tokenizer):
    return alpaca_batch(shared_data, tokenizer)


class _Block(torch.nn.Module):
    """q, k and v read one input, as in a transformer block; o reads another."""

    def __init__(self, width: int):
        super().__init__()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, torch.nn.Linear(width, width, bias=False))

    def forward(self, x, other):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x), self.o_proj(other)


def _adapter_is_identity(block: torch.nn.Module) -> None:
    """Frozen weights 0 and A = B = I at scale 1: each layer outputs its adapter's dropped input."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "base_layer" in name:
                p.zero_()
            else:
                p.copy_(torch.eye(p.shape[0]))


def test_layers_that_read_one_input_share_one_dropout_mask():
    """While training, q, k and v, called with one tensor, see one dropout mask (each kept
    element scaled by 1 / (1 - p)); a layer reading another tensor draws its own; a tensor that
    is not the one the mask was drawn for, or was changed in place since, gets a mask of its
    own. In eval mode the adapters see their input as it is. The layers survive pickling, and
    run peft's forward again afterwards."""
    width, p = 48, 0.2
    scale = 65536 / (65536 - round(p * 65536))  # FastDropout's 1 / (1 - p)
    config = LoraConfig(r=width, lora_alpha=width, lora_dropout=p, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert dispatch_fast_lora(config)
    block = get_peft_model(_Block(width), config)
    with fast_dropout_in(block) as drops, fast_lora_in(block) as switched:
        assert drops == 4 and switched == 4
        layers = {n.rsplit(".", 1)[-1]: m for n, m in block.named_modules() if isinstance(m, FastLoraLinear)}
        assert layers["q_proj"].same_input is layers["v_proj"].same_input is not None
        assert layers["o_proj"].same_input is None
        _adapter_is_identity(block)
        block.train()
        x, other = torch.randn(256, width), torch.randn(256, width)
        torch.manual_seed(0)
        q, k, v, o = block(x, other)
        assert torch.equal(q, k) and torch.equal(q, v)  # one mask for the three
        kept = q != 0
        assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)
        torch.testing.assert_close(q[kept], x[kept] * scale)
        o_kept = o != 0
        assert not torch.equal(o_kept, kept) and o_kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)
        assert layers["q_proj"].same_input.x is None  # nothing held once all three have taken their part
        torch.manual_seed(0)
        assert torch.equal(block(x, other)[0], q)  # torch's seed decides the mask

        xg = x.clone().requires_grad_()
        torch.manual_seed(1)
        q, k, v, _ = block(xg, other)
        (q + 2 * k + 3 * v).sum().backward()  # d/dx: 6 x mask / (1 - p), the same mask as forward
        torch.testing.assert_close(xg.grad, 6 * (q.detach() != 0) * scale)

        q = layers["q_proj"](x)
        k = layers["k_proj"](other)  # not the tensor q's mask was drawn for: k works on its own input
        torch.testing.assert_close(k[k != 0], (other * scale)[k != 0])
        y = x.clone()
        q = layers["q_proj"](y)
        y.add_(1.0)  # changed in place after q read it: k must not reuse q's work
        k = layers["k_proj"](y)
        torch.testing.assert_close(k[k != 0], (y * scale)[k != 0])

        block.eval()
        assert all(torch.equal(out, x) for out in block(x, x))
        with torch.inference_mode():
            assert all(torch.equal(out, x) for out in block(x.clone(), x))
        again = pickle.loads(pickle.dumps(block))
        assert all(torch.equal(out, x) for out in again(x, x))
        assert type(again.base_model.model.q_proj) is FastLoraLinear
    assert not any(m.fast or "same_input" in vars(m) for m in layers.values())
    assert not any(isinstance(m, FastDropout) for m in block.modules())
    assert all(torch.equal(out, x) for out in block(x, x))  # peft's own layers compute the same


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_fast_lora_layers_give_peft_s_loss_and_gradients(tiny_model_dir, batch, precision):
    """The same loss and adapter gradients as peft's own LoRA layers: to float rounding in fp32;
    under bf16 autocast (with the frozen weights in bf16, as training runs) as near fp32's as
    peft's are. Evaluation, and the adapters switched off, give what peft gives."""
    model = lora_model(tiny_model_dir, lora_dropout=0.0)  # no masks: comparable
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(layers) == 14 and all(type(m) is FastLoraLinear and not m.fast for m in layers)
    with fast_lora_in(model) as switched:
        assert switched == 14 and all(m.fast for m in layers)
        assert sum(m.same_input is not None for m in layers) == 10  # q, k, v and gate, up of 2 blocks
    assert not any(m.fast for m in layers)
    randomize_lora_b(model, std=0.05)

    def run(fast: bool, dtype: str, train: bool = True):
        model.train(train)
        model.zero_grad()
        with fast_lora_in(model) if fast else contextlib.nullcontext(), frozen_weights_in(model, dtype), \
                torch.set_grad_enabled(train), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            assert all(m.fast == fast for m in layers)
            out = model(**batch)
            if not train:
                return out.logits.float()
            out.loss.backward()  # inside: the backward runs the layers' own autograd either way
        return out.loss.detach(), adapter_grads(model)

    reference_loss, reference = run(False, "float32")
    loss, grads = run(True, precision)
    if precision == "float32":
        torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    else:
        peft_loss, peft_grads = run(False, precision)
        assert abs(loss - reference_loss) <= 2 * abs(peft_loss - reference_loss) + 1e-3

        def distance(g):  # relative distance of all adapter gradients from fp32's
            return (torch.cat([(g[n] - reference[n]).flatten() for n in reference]).norm()
                    / torch.cat([reference[n].flatten() for n in reference]).norm()).item()
        assert distance(grads) <= 1.5 * distance(peft_grads) and distance(grads) < 0.05
    torch.testing.assert_close(run(True, precision, train=False), run(False, precision, train=False),
                               rtol=0, atol=1e-4 if precision == "float32" else 0.1)
    with model.disable_adapter():
        off = run(True, precision, train=False)
        base = run(False, precision, train=False)
    assert torch.equal(off, base)
    assert not any(m.fast for m in layers)


def test_only_plain_lora_linears_are_switched(tiny_model_dir):
    """A layer peft wraps otherwise (fan-in/fan-out weights, another base layer) keeps peft's
    forward; a model without LoRA has nothing to switch; a failure inside turns the fast path off."""
    model = lora_model(tiny_model_dir, lora_dropout=0.0)
    odd = model.get_base_model().model.layers[0].self_attn.q_proj
    odd.fan_in_fan_out = True
    with fast_lora_in(model) as switched:
        assert switched == 13 and not odd.fast
    with pytest.raises(RuntimeError, match="step failed"), fast_lora_in(model):
        raise RuntimeError("step failed")
    assert not any(m.fast for m in model.modules() if isinstance(m, FastLoraLinear))
    with fast_lora_in(torch.nn.Sequential(torch.nn.Linear(4, 4))) as switched:
        assert switched == 0


def test_peft_builds_the_fast_layer_for_plain_linears_only(tiny_model_dir, monkeypatch):
    """Through peft's dispatch: a plain nn.Linear gets FastLoraLinear, a subclass of it (as
    bitsandbytes' 4- and 8-bit layers are) gets peft's own layer; a peft without the dispatch
    builds its own everywhere, and the fast path has nothing to switch."""
    class Subclass(torch.nn.Linear):
        pass
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), Subclass(8, 8))
    config = LoraConfig(r=2, target_modules=["0", "1"])
    dispatch_fast_lora(config)
    model = get_peft_model(net, config)
    assert [type(model.base_model.model[i]) for i in (0, 1)] == [FastLoraLinear, Linear]
    monkeypatch.delattr(LoraConfig, "_register_custom_module")
    model = lora_model(tiny_model_dir, lora_dropout=0.0)
    assert {type(m) for m in model.modules() if isinstance(m, Linear)} == {Linear}
    with fast_lora_in(model) as switched:
        assert switched == 0
    with kernels.for_training(model, "float32", enabled=True) as applied:  # said in one line, all off
        assert applied.describe() == (f"CPU kernels off: peft {compat.version('peft')} has no method "
                                      "LoraConfig._register_custom_module; training runs peft's own code")
