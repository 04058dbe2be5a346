"""The model-layout table (vllm_steer.core.layout) points each hook kind at the right module and tensor."""

from __future__ import annotations

import pytest
import torch

from vllm_steer.core.layout import (
    ARCHITECTURES,
    FAMILIES,
    HOOK_KINDS,
    DecoderLayout,
    Placement,
    UnsupportedArchitecture,
    decoder_layers,
    layout_for,
    vllm_layout_for,
)
from vllm_steer.core.methods import METHODS


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config).eval()


def test_every_hook_kind_has_a_place_in_every_family():
    for family, layout in FAMILIES.items():
        assert layout.family == family
        for tree in (layout.vllm, layout.hf):
            assert set(tree.placements) == set(HOOK_KINDS), family
    assert set(ARCHITECTURES.values()) <= set(FAMILIES)
    assert {kind for m in METHODS.values() for kind in m.hooks} <= set(HOOK_KINDS)


def test_llama_modules(tiny_llama):
    layout = layout_for(tiny_llama)
    assert layout.family == "llama"
    hf = layout.hf
    layers = hf.layers(tiny_llama)
    assert layers is tiny_llama.model.layers and layers is decoder_layers(tiny_llama)
    for block in layers:
        expected = {
            "layer_input": block,
            "layer_output": block,
            "input_norm": block.input_layernorm,
            "post_attn_norm": block.post_attention_layernorm,
            "attn_output": block.self_attn,
            "mlp_output": block.mlp,
        }
        for kind, module in expected.items():
            assert hf.module(block, kind) is module, kind
            assert layout.vllm.module(block, kind) is module, kind  # the same names in vLLM's tree
    assert hf.placement("layer_input") == Placement("", "input") and hf.placement("layer_input").stream
    assert hf.placement("layer_output").point == "output" and hf.placement("layer_output").stream
    assert not hf.placement("input_norm").stream
    assert (layout.vllm.residual, layout.hf.residual) == ("fused", "plain")
    assert layout.vllm.arg_index("hidden_states") == 1 and layout.vllm.arg_index("residual") == 2
    assert layout.hf.arg_index("hidden_states") == 0 and layout.hf.arg_index("residual") is None


def test_each_kind_reads_what_the_docs_say(tiny_llama):
    """On the HF model: the stream kinds are the residual stream (hidden_states), the norms normalize it, and the
    attention and MLP outputs are what each adds to it."""
    hf = layout_for(tiny_llama).hf
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(hf.layers(tiny_llama)):
        for kind in HOOK_KINDS:
            module = hf.module(block, kind)
            if hf.placement(kind).point == "input":

                def pre(module, args, kwargs, key=(i, kind)):
                    seen[key] = (args[0] if args else kwargs["hidden_states"]).detach()

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(module, args, output, key=(i, kind)):
                    seen[key] = (output[0] if isinstance(output, tuple) else output).detach()

                handles.append(module.register_forward_hook(post))
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            out = tiny_llama(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    states = out.hidden_states  # [embeddings, after layer 0, after layer 1 (final-normed)]
    for i, block in enumerate(hf.layers(tiny_llama)):
        stream_in = seen[(i, "layer_input")]
        torch.testing.assert_close(stream_in, states[i])
        torch.testing.assert_close(seen[(i, "input_norm")], block.input_layernorm(stream_in))
        mid = stream_in + seen[(i, "attn_output")]
        torch.testing.assert_close(seen[(i, "post_attn_norm")], block.post_attention_layernorm(mid))
        torch.testing.assert_close(seen[(i, "layer_output")], mid + seen[(i, "mlp_output")])
    torch.testing.assert_close(seen[(0, "layer_output")], states[1])


def test_unknown_hook_kind_is_refused(tiny_llama):
    hf = layout_for(tiny_llama).hf
    block = hf.layers(tiny_llama)[0]
    with pytest.raises(ValueError, match="unknown hook kind 'residual_mid'"):
        hf.module(block, "residual_mid")
    with pytest.raises(ValueError, match="unknown hook kind 'residual_mid'"):
        hf.placement("residual_mid")
    with pytest.raises(ValueError, match=r"unknown hook kinds \['residual_mid'\]"):
        DecoderLayout("model.layers", {"residual_mid": Placement("")}, residual="plain", block_args=("hidden_states",))


def test_a_model_without_decoder_layers_is_refused():
    with pytest.raises(TypeError, match=r"has no model\.layers"):
        layout_for("LlamaForCausalLM").hf.layers(torch.nn.Linear(2, 2))


def test_architecture_lookup():
    assert layout_for("LlamaForCausalLM") is FAMILIES["llama"]
    assert layout_for("Qwen3MoeForCausalLM") is FAMILIES["llama"]
    assert layout_for("MixtralForCausalLM") is FAMILIES["mixtral"]
    assert layout_for("Gemma3ForCausalLM") is FAMILIES["gemma"]


def test_an_architecture_not_in_the_table_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(
        UnsupportedArchitecture, match=r"cannot steer SomeNewForCausalLM: .*Supported architectures: .*"
    ):
        layout_for("SomeNewForCausalLM")
    with pytest.raises(UnsupportedArchitecture, match="multimodal Gemma 3"):
        layout_for("Gemma3ForConditionalGeneration")


def _model(cls: str, architecture: str) -> torch.nn.Module:
    model = type(cls, (torch.nn.Module,), {})()
    model.config = type("Config", (), {"architectures": [architecture]})()
    return model


def test_each_family_is_hooked_only_in_the_tree_vllm_builds_for_it():
    """Llama natively (fused stream), OLMo 2 through the Transformers backend (the HF tree): never the other way."""
    assert vllm_layout_for(_model("LlamaForCausalLM", "LlamaForCausalLM")) is FAMILIES["llama"].vllm
    assert vllm_layout_for(_model("TransformersForCausalLM", "Olmo2ForCausalLM")) is FAMILIES["olmo2"].vllm
    with pytest.raises(
        UnsupportedArchitecture, match=r"LlamaForCausalLM served through vLLM's Transformers backend \(Transformers"
    ):
        vllm_layout_for(_model("TransformersForCausalLM", "LlamaForCausalLM"))
    with pytest.raises(UnsupportedArchitecture, match=r"Olmo2ForCausalLM served natively by vLLM"):
        vllm_layout_for(_model("Olmo2ForCausalLM", "Olmo2ForCausalLM"))
    assert layout_for(_model("Olmo2ForCausalLM", "Olmo2ForCausalLM")) is FAMILIES["olmo2"]  # HF's own class


def test_olmo2_sublayers_read_the_stream_itself():
    """OLMo 2 has no norm in front of attention or the MLP: the norm kinds are those sublayers' inputs."""
    olmo2 = FAMILIES["olmo2"]
    assert olmo2.vllm is olmo2.hf and olmo2.hf.residual == "plain" and olmo2.transformers_backend
    assert olmo2.hf.placement("input_norm") == Placement("self_attn", "input")
    assert olmo2.hf.placement("post_attn_norm") == Placement("mlp", "input")
    assert olmo2.hf.placement("attn_output").module == "post_attention_layernorm"
    assert olmo2.hf.placement("mlp_output").module == "post_feedforward_layernorm"


def test_gemma_kinds_keep_their_meaning():
    """Gemma's sandwich norms: the MLP reads pre_feedforward_layernorm; what is added is each post-norm's output."""
    gemma = FAMILIES["gemma"]
    for tree in (gemma.vllm, gemma.hf):
        assert tree.placement("post_attn_norm").module == "pre_feedforward_layernorm"
        assert tree.placement("attn_output").module == "post_attention_layernorm"
        assert tree.placement("mlp_output").module == "post_feedforward_layernorm"
    assert FAMILIES["mixtral"].vllm.placement("mlp_output").module == "block_sparse_moe"
    assert FAMILIES["mixtral"].hf.placement("mlp_output").module == "mlp"


class _FusedNorm(torch.nn.Module):
    """vLLM's RMSNorm shape: ``norm(x)`` alone, or the fused add + norm ``(norm(x + residual), x + residual)``."""

    def forward(self, x, residual=None):
        stream = x if residual is None else x + residual
        normed = stream / stream.norm(dim=-1, keepdim=True)
        return normed if residual is None else (normed, stream)


class _VllmBlock(torch.nn.Module):
    """A vLLM-style Llama decoder layer: ``forward(positions, hidden_states, residual) -> (hidden, residual)``."""

    def __init__(self, d):
        super().__init__()
        self.input_layernorm = _FusedNorm()
        self.post_attention_layernorm = _FusedNorm()
        self.self_attn = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Linear(d, d)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual, h = hidden_states, self.input_layernorm(hidden_states)
        else:
            h, residual = self.input_layernorm(hidden_states, residual)
        h = self.self_attn(h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


def test_engine_hooks_follow_the_vllm_layout():
    """install_hooks puts each site where the layout says, on vLLM's fused residual stream: a stub runtime
    records what each site's op reads and returns a constant per site, and the result is recomputed by hand."""
    from vllm_steer.engine.runtime import Site, get_runtime, set_runtime
    from vllm_steer.engine.vllm._hooks import install_hooks

    d = 8
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([_VllmBlock(d), _VllmBlock(d)])
    block = model.model.layers[1]
    kinds = ["layer_input", "input_norm", "attn_output", "post_attn_norm", "mlp_output", "layer_output"]
    sites = [Site(1, kind) for kind in kinds]
    seen: dict[str, torch.Tensor] = {}

    class Stub:
        def delta(self, h, site):
            seen[kinds[site]] = h.clone()
            return torch.full_like(h, 0.5 * (site + 1))

    push = {kind: 0.5 * (i + 1) for i, kind in enumerate(kinds)}
    x, r = torch.randn(3, d), torch.randn(3, d)
    previous = get_runtime()
    handles = install_hooks(model, sites, FAMILIES["llama"].vllm)
    try:
        set_runtime(Stub())
        with torch.no_grad():
            hidden, residual = block(None, x, r)
    finally:
        set_runtime(previous)
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(seen["layer_input"], x + r)  # the stream is hidden + residual
        h_in = x + push["layer_input"]
        normed, stream = block.input_layernorm(h_in, r)
        torch.testing.assert_close(seen["input_norm"], normed)
        attn_in = normed + push["input_norm"]
        torch.testing.assert_close(seen["attn_output"], block.self_attn(attn_in))
        attn = block.self_attn(attn_in) + push["attn_output"]
        normed2, stream2 = block.post_attention_layernorm(attn, stream)
        torch.testing.assert_close(seen["post_attn_norm"], normed2)
        mlp = block.mlp(normed2 + push["post_attn_norm"]) + push["mlp_output"]
        torch.testing.assert_close(seen["mlp_output"], mlp - push["mlp_output"])
        torch.testing.assert_close(seen["layer_output"], mlp + stream2)
        torch.testing.assert_close(hidden, mlp + push["layer_output"])
        torch.testing.assert_close(residual, stream2)


def test_mistral_with_time_conditioning_is_refused():
    """Voxtral-style Mistral blocks scale the MLP's input after post_attention_layernorm: not the hooked point."""
    model = _model("MistralForCausalLM", "MistralForCausalLM")
    assert layout_for(model) is FAMILIES["llama"]
    model.config.ada_rms_norm_t_cond = True
    with pytest.raises(UnsupportedArchitecture, match="ada_rms_norm_t_cond"):
        layout_for(model)
