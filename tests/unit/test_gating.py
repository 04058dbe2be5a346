"""Gates in the runtime (vllm_steer.engine.gating, SteeringRuntime): which tokens a gated request steers, step by
step, whatever the chunking; decisions held across preemption; rows given back; a captured graph's padded
evaluation equal to the host-sized one; the cache salt of a gated request."""

from __future__ import annotations

import pytest
import torch

import vllm_steer.engine.runtime as runtime_mod
from support.runtime import FP, D
from vllm_steer.core.gates import GateSpec, gate_score
from vllm_steer.core.request import SteeringRequestError, cache_salt, parse_steering, resolve_steering
from vllm_steer.engine.gating import RowsExhaustedError
from vllm_steer.engine.runtime import Site, SteeringRuntime, sites_for_profiles
from vllm_steer.testing.hf_reference import reference_op
from vllm_steer.testing.synthetic import random_profile, with_gates

GATE = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)
_OTHER = torch.randn(D, generator=torch.Generator().manual_seed(6))
ORTHOGONAL = torch.nn.functional.normalize(_OTHER - (_OTHER @ GATE) * GATE, dim=0)


def _profiles() -> dict:
    add = random_profile("add", "addition", FP, [0, 1, 2, 3], seed=1, vector_norm=3.0, scale=1.5)
    two_gates = [
        GateSpec(name="a", layer=1, tensor="g.a", score="projection", threshold=0.5),
        GateSpec(name="b", layer=2, tensor="g.b", score="cast", threshold=0.5),  # off-axis: never fires here
    ]
    return {
        "add": add,
        "gated": with_gates(
            random_profile("gated", "addition", FP, [0, 1, 2, 3], seed=2, vector_norm=3.0, scale=1.5),
            "steer",
            two_gates,
            {"a": GATE, "b": ORTHOGONAL},
        ),
        "refuse": with_gates(
            random_profile("refuse", "addition", FP, [1], seed=4, vector_norm=3.0, scale=1.5),
            "refuse",
            [GateSpec(name="a", layer=1, tensor="g.a", score="projection", threshold=0.5)],
            {"a": GATE},
            refusal="no",
        ),
        "flag": with_gates(
            random_profile("flag", "addition", FP, [0, 1, 2, 3], seed=3, vector_norm=3.0, scale=1.5),
            "flag",
            [GateSpec(name="a", layer=1, tensor="g.a", score="projection", threshold=0.5)],
            {"a": GATE},
        ),
    }


PROFILES = _profiles()
SITES = sites_for_profiles(PROFILES)
OUTPUT_SITES = [Site(layer, "layer_output") for layer in range(4)]


def steer(profile: str):
    return resolve_steering(parse_steering({"steer_profile": profile}), PROFILES)


REFUSAL_IDS = {"no": [7, 8, 9]}
EOS = 2
VOCAB = 12


def make_runtime(max_requests: int = 4) -> SteeringRuntime:
    return SteeringRuntime(
        PROFILES,
        SITES,
        hidden_size=D,
        max_slots=4,
        max_tokens=32,
        max_requests=max_requests,
        tokenize=lambda text: REFUSAL_IDS[text],
    )


def hidden(fires: bool, n: int) -> torch.Tensor:
    """``n`` token states; a state along the gate direction scores ~0.95 on gate ``a`` (fires), one against it
    scores ~-0.95 (does not)."""
    noise = 0.1 * torch.randn(n, D, generator=torch.Generator().manual_seed(n))
    return (GATE if fires else -GATE) * 3 + noise


def run_step(rt: SteeringRuntime, h: torch.Tensor) -> dict[int, torch.Tensor]:
    """A toy forward pass: every output site in layer order, on the same states; the delta per layer."""
    return {site.layer: rt.delta(h, rt.site_ids[site]) for site in OUTPUT_SITES}


def steered_rows(deltas: dict[int, torch.Tensor]) -> dict[int, list[int]]:
    return {layer: [i for i in range(d.shape[0]) if d[i].abs().sum() > 0] for layer, d in deltas.items()}


def test_gate_sites_are_hooked():
    assert Site(1, "layer_output") in SITES and Site(2, "layer_output") in SITES


@pytest.mark.parametrize("chunks", [[5], [3, 2], [1, 1, 1, 1, 1], [4, 1]])
@pytest.mark.parametrize("fires", [True, False])
def test_a_gated_request_steers_by_its_last_prompt_token_whatever_the_chunking(chunks, fires):
    """Prompt of 5 tokens in ``chunks``, then two decode steps. Prompt tokens before the last: never steered.
    The last one: at layers after the deepest gate (2), if fired. Generated tokens: every layer, if fired."""
    rt = make_runtime()
    rt.add_request("r", steer("gated"))
    start = 0
    for size in chunks:
        rt.begin_step(["r"], [size], [start], [5])
        deltas = steered_rows(run_step(rt, hidden(fires, size)))
        last = 4 - start  # the last prompt token's row in this step, if it is here
        expected_late = [last] if fires and 0 <= last < size else []
        assert deltas == {0: [], 1: [], 2: [], 3: expected_late}, (chunks, start)
        start += size
    decision = rt.decision("r")
    assert decision is not None and decision.fired is fires
    assert decision.scores["a"] == pytest.approx(gate_score(hidden(fires, chunks[-1])[-1], GATE, "projection").item())
    for step in range(2):
        rt.begin_step(["r"], [1], [5 + step], [5])
        assert steered_rows(run_step(rt, hidden(not fires, 1))) == {k: [0] if fires else [] for k in range(4)}


def test_rows_of_a_mixed_step_are_independent():
    """One step: a gated row that fires, one that does not (both deciding), an ungated steered row, an unsteered
    row. The ungated steered row gets exactly the plain op's correction; the others their gate's."""
    rt = make_runtime()
    for req, profile in (("yes", "gated"), ("no", "gated"), ("plain", "add")):
        rt.add_request(req, steer(profile))
    h = torch.cat([hidden(True, 2), hidden(False, 2), hidden(True, 2), hidden(True, 2)])
    rt.begin_step(["yes", "no", "plain", "free"], [2, 2, 2, 2], [0, 0, 0, 0], [2, 2, 2, 2])
    deltas = run_step(rt, h)
    assert steered_rows(deltas) == {0: [4, 5], 1: [4, 5], 2: [4, 5], 3: [1, 4, 5]}
    for layer in range(4):
        expected = reference_op(PROFILES["add"], steer("add"), layer)(h[4:6]) - h[4:6]
        torch.testing.assert_close(deltas[layer][4:6], expected, rtol=1e-5, atol=1e-5)
    expected = reference_op(PROFILES["gated"], steer("gated"), 3)(h[1:2]) - h[1:2]
    torch.testing.assert_close(deltas[3][1:2], expected, rtol=1e-5, atol=1e-5)
    assert rt.decision("yes").fired is True and rt.decision("no").fired is False
    assert rt.decision("plain") is None


def test_a_recomputed_prompt_keeps_its_decision():
    """After preemption the request is computed again from position 0 (prompt and generated tokens): its last
    prompt token is not decided again, even on states that would now decide otherwise."""
    rt = make_runtime()
    rt.add_request("r", steer("gated"))
    rt.begin_step(["r"], [3], [0], [3])
    run_step(rt, hidden(True, 3))
    assert rt.decision("r").fired is True
    rt.begin_step(["r"], [5], [0], [3])  # recompute: 3 prompt tokens and 2 generated
    deltas = steered_rows(run_step(rt, hidden(False, 5)))
    assert deltas == {0: [3, 4], 1: [3, 4], 2: [3, 4], 3: [2, 3, 4]}
    assert rt.decision("r").fired is True


def test_flag_decides_and_steers_nothing():
    rt = make_runtime()
    rt.add_request("f", steer("flag"))
    rt.begin_step(["f"], [3], [0], [3])
    assert steered_rows(run_step(rt, hidden(True, 3))) == {k: [] for k in range(4)}
    rt.begin_step(["f"], [1], [3], [3])
    assert steered_rows(run_step(rt, hidden(True, 1))) == {k: [] for k in range(4)}
    assert rt.decision("f").fired is True


def test_decision_rows_are_given_back_and_bounded():
    rt = make_runtime(max_requests=1)  # 4 rows
    for i in range(4):
        rt.add_request(f"r{i}", steer("gated"))
    assert rt.gates.rows_in_use == 4
    with pytest.raises(RowsExhaustedError, match="max_num_seqs"):
        rt.add_request("r4", steer("gated"))
    assert rt.slots_in_use == 1 and not rt.is_bound("r4"), "a refused request holds nothing"
    rt.remove_request("r0")
    rt.add_request("r4", steer("gated"))
    assert rt.decision("r4").fired is None, "a reused row starts undecided"
    for i in range(1, 5):
        rt.remove_request(f"r{i}")
    assert rt.gates.rows_in_use == 0 and rt.slots_in_use == 0


def test_begin_step_needs_positions_for_a_gated_request():
    rt = make_runtime()
    rt.add_request("r", steer("gated"))
    with pytest.raises(RuntimeError, match="num_computed"):
        rt.begin_step(["r"], [2])
    rt.begin_step(["x"], [2])  # no gated request: positions not needed


def test_the_padded_evaluation_of_a_captured_graph_equals_the_host_sized_one(monkeypatch):
    """Inside a CUDA-graph capture the gates evaluate every padded entry (a graph serves any step). Forced on
    CPU: the same deltas and decisions as the host-sized evaluation."""

    def run(capturing: bool):
        monkeypatch.setattr(runtime_mod, "_capturing_cuda_graph", lambda h: capturing)
        rt = make_runtime()
        rt.add_request("yes", steer("gated"))
        rt.add_request("no", steer("gated"))
        rt.begin_step(["yes", "no"], [3, 3], [0, 0], [3, 3])
        h = torch.cat([hidden(True, 3), hidden(False, 3)])
        return run_step(rt, h), rt.decision("yes"), rt.decision("no")

    host, captured = run(False), run(True)
    for layer in range(4):
        assert torch.equal(host[0][layer], captured[0][layer])
    assert host[1:] == captured[1:]


def test_a_gated_requests_cache_salt_holds_its_prompt_length():
    gated, plain = steer("gated"), steer("add")
    assert gated.gated and not plain.gated
    assert cache_salt(gated, None, None, 5) != cache_salt(gated, None, None, 6)
    assert cache_salt(gated, None, None, 5) == cache_salt(gated, None, None, 5)
    assert cache_salt(plain, None, None, 5) == cache_salt(plain, None, None, 6) == cache_salt(plain, None)
    with pytest.raises(ValueError, match="prompt length"):
        cache_salt(gated, None)


def test_a_refusing_request_is_forced_token_by_token_only_if_its_gate_fired():
    """Batch order = logits rows: a refusing row that fires, one that does not, an unsteered row. The fired row
    gets the refusal's tokens one per step, then its EOS (again, if generation goes on); the others keep their
    logits exactly; a prompt chunk before the last forces nothing."""
    rt = make_runtime()
    rt.add_request("yes", steer("refuse"), eos_token_id=EOS)
    rt.add_request("no", steer("refuse"), eos_token_id=EOS)
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    # a first chunk of "yes" (prompt of 4): nothing sampled for it yet
    rt.begin_step(["yes", "no", "free"], [2, 3, 1], [0, 0, 5], [4, 3, 5])
    run_step(rt, torch.cat([hidden(True, 2), hidden(False, 3), hidden(True, 1)]))
    out = rt.force_refusals(logits.clone())
    assert torch.equal(out, logits), "no row refuses yet: 'yes' is mid-prompt, 'no' did not fire"
    tokens = []
    computed = 2
    for step in range(5):
        count = 2 if step == 0 else 1
        rt.begin_step(["yes", "no", "free"], [count, 1, 1], [computed, 3 + step, 6 + step], [4, 3, 5])
        run_step(rt, torch.cat([hidden(True, count), hidden(False, 1), hidden(True, 1)]))
        out = rt.force_refusals(logits.clone())
        assert torch.isinf(out[0]).sum() == VOCAB - 1 and out[0].max() == 0, "one finite logit: the forced token"
        tokens.append(int(out[0].argmax()))
        assert torch.equal(out[1:], logits[1:]), "every other row untouched"
        computed += count
    assert tokens == [7, 8, 9, EOS, EOS]
    assert rt.decision("yes").fired is True and rt.decision("no").fired is False


def test_a_refusal_needs_the_requests_eos_and_is_tokenized_once():
    rt = make_runtime()
    with pytest.raises(RuntimeError, match="end-of-sequence"):
        rt.add_request("r", steer("refuse"))
    assert not rt.is_bound("r")
    calls = []
    rt._tokenize = lambda text: calls.append(text) or [5]
    rt.add_request("a", steer("refuse"), eos_token_id=EOS)
    rt.add_request("b", steer("refuse"), eos_token_id=EOS)
    assert calls == ["no"] and rt.refusal_ids("no") == (5,)


def test_decisions_are_read_back_for_the_server_bound_or_finished():
    rt = make_runtime()
    rt.add_request("cmpl-steer-1-0-ab", steer("gated"))
    rt.add_request("cmpl-steer-1-1-cd", steer("gated"))
    rt.add_request("cmpl-steer-2-0-ef", steer("flag"))
    rt.begin_step(["cmpl-steer-1-0-ab", "cmpl-steer-1-1-cd", "cmpl-steer-2-0-ef"], [2, 2, 2], [0, 0, 0], [2, 2, 2])
    run_step(rt, torch.cat([hidden(True, 2), hidden(False, 2), hidden(True, 2)]))
    live = rt.gate_decisions("steer-1-")
    assert [(d["request"], d["fired"], d["gates"], d["action"]) for d in live] == [
        ("cmpl-steer-1-0-ab", True, ["a"], "steer"),
        ("cmpl-steer-1-1-cd", False, [], "steer"),
    ]
    assert set(live[0]["scores"]) == {"a", "b"}
    for req in ("cmpl-steer-1-0-ab", "cmpl-steer-1-1-cd", "cmpl-steer-2-0-ef"):
        rt.remove_request(req)
    assert rt.gate_decisions("steer-1-") == live, "finished requests keep their decision for the server"
    assert rt.gate_decisions("steer-2-")[0]["fired"] is True and rt.gate_decisions("steer-3-") == []


def test_a_request_may_name_the_gate_action_and_refusal_where_the_profile_has_gates():
    def resolve(**keys):
        return resolve_steering(parse_steering({"steer_profile": "gated", **keys}), PROFILES)

    assert resolve().gate_action == "steer" and resolve().refusal is None
    flagged = resolve(steer_gate_action="flag")
    assert flagged.gate_action == "flag" and flagged.slot_key != resolve().slot_key
    refusing = resolve(steer_gate_action="refuse", steer_refusal="Not here.")
    assert (refusing.gate_action, refusing.refusal) == ("refuse", "Not here.")
    assert resolve(steer_gate_action="refuse").refusal == PROFILES["gated"].spec.gating.refusal
    for keys, field in (
        ({"steer_gate_action": "block"}, "steer_gate_action"),
        ({"steer_refusal": "x"}, "steer_refusal"),  # the profile's action is steer
        ({"steer_gate_action": "refuse", "steer_refusal": ""}, "steer_refusal"),
        ({"steer_gate_action": "refuse", "steer_refusal": "x" * 2001}, "steer_refusal"),
        ({"steer_gate_action": "refuse", "steer_refusal": 7}, "steer_refusal"),
    ):
        with pytest.raises(SteeringRequestError) as err:
            resolve(**keys)
        assert err.value.field == field, (keys, err.value)
    with pytest.raises(SteeringRequestError) as err:
        resolve_steering(parse_steering({"steer_profile": "add", "steer_gate_action": "flag"}), PROFILES)
    assert err.value.field == "steer_gate_action" and "no gates" in err.value.message


def test_a_flagging_request_on_a_steering_profile_steers_nothing():
    rt = make_runtime()
    rt.add_request("s", steer("gated"))
    rt.add_request(
        "f", resolve_steering(parse_steering({"steer_profile": "gated", "steer_gate_action": "flag"}), PROFILES)
    )
    assert rt.slots_in_use == 2
    rt.begin_step(["s", "f"], [2, 2], [0, 0], [2, 2])
    assert steered_rows(run_step(rt, hidden(True, 4))) == {0: [], 1: [], 2: [], 3: [1]}
    assert rt.decision("f").fired is True and rt.gate_decisions("f")[0]["action"] == "flag"


# ------------------------------------------------------------------ category routing

ROUTED = with_gates(
    random_profile(
        "routed", "category", FP, [0, 1, 2, 3], seed=7, vector_norm=3.0, scale=1.5, categories=("x", "y", "z")
    ),
    "steer",
    [
        GateSpec(name="harm", layer=1, tensor="g.harm", score="cast", threshold=0.5),  # decides: along ±GATE
        GateSpec(name="gx", layer=1, tensor="g.x", score="projection", threshold=0.5, category="x"),
        GateSpec(name="gy", layer=2, tensor="g.y", score="projection", threshold=0.2, category="y"),
        GateSpec(name="gz", layer=1, tensor="g.z", score="projection", threshold=-0.5, comparison="<", category="z"),
    ],
    {"harm": GATE, "gx": GATE, "gy": GATE, "gz": GATE},
)
ROUTING = {**PROFILES, "routed": ROUTED}


def routed(categories: object = "auto"):
    return resolve_steering(parse_steering({"steer_profile": "routed", "steer_categories": categories}), ROUTING)


def routing_runtime(max_slots: int = 6) -> SteeringRuntime:
    return SteeringRuntime(ROUTING, sites_for_profiles(ROUTING), hidden_size=D, max_slots=max_slots, max_tokens=32)


def test_auto_resolves_to_the_gates_categories():
    auto = routed()
    assert auto.route == ("x", "y", "z") and auto.categories == () and auto.gate_action == "steer"
    assert auto.slot_key != routed(["x"]).slot_key
    for bad, where in (({"steer_profile": "gated", "steer_categories": "auto"}, "no categories"),
                       ({"steer_profile": "routed", "steer_categories": "auto", "steer_gate_action": "flag"}, "'steer'")):  # fmt: skip
        with pytest.raises(SteeringRequestError, match=where) as err:
            resolve_steering(parse_steering(bad), ROUTING)
        assert err.value.field == "steer_categories"


@pytest.mark.parametrize(
    ("state", "category"),
    [("along", "y"), ("against", "z"), ("across", None), ("weak", None)],
)
def test_a_gated_routing_request_steers_with_the_category_of_the_largest_routing_margin(state, category):
    """The cast gate ``harm`` decides (it fires along and against the direction, not across it, nor on a state
    mostly across it). Along it, the routing margins are ~0.45 (``gx``, layer 1), ~0.75 (``gy``, layer 2) and
    ~-1.45 (``gz``): ``y`` wins, decided at the deeper site. Against it ``z`` wins. The weak state's ``gy``
    score (~0.29) passes its threshold, but routing gates do not decide: not gated, unsteered."""
    base = {"along": GATE, "against": -GATE, "across": ORTHOGONAL, "weak": 0.3 * GATE + ORTHOGONAL}[state]
    h = base * 3 + 0.05 * torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    rt = routing_runtime()
    rt.add_request("r", routed())
    assert rt.slots_in_use == 4, "its own slot (the gates) and one per category"
    rt.begin_step(["r"], [3], [0], [3])
    deltas = run_step(rt, h)
    want = None if category is None else routed([category])
    assert steered_rows(deltas) == {0: [], 1: [], 2: [], 3: [2] if want else []}
    if want is not None:
        expected = reference_op(ROUTED, want, 3)(h[2:3]) - h[2:3]
        torch.testing.assert_close(deltas[3][2:3], expected, rtol=1e-5, atol=1e-5)
    rt.begin_step(["r"], [1], [3], [3])  # a generated token, on states that would now route elsewhere
    g = -h[:1]
    deltas = run_step(rt, g)
    for layer in range(4):
        if want is None:
            assert not deltas[layer].abs().any()
        else:
            expected = reference_op(ROUTED, want, layer)(g) - g
            torch.testing.assert_close(deltas[layer], expected, rtol=1e-5, atol=1e-5)
    (record,) = rt.gate_decisions("r")
    assert record["category"] == category and record["fired"] is (category is not None)
    assert record["gates"] == (["harm"] if category else []) and record["route_gates"] == ["gx", "gy", "gz"]
    if state == "weak":
        assert record["scores"]["gy"] > 0.2 and record["scores"]["harm"] < 0.5, record["scores"]


def test_a_request_naming_its_category_on_a_routing_profile_is_decided_by_the_deciding_gate_alone():
    rt = routing_runtime()
    rt.add_request("x", routed(["x"]))
    h = (0.3 * GATE + ORTHOGONAL) * 3 + torch.zeros(2, D)  # gy's score passes its threshold; harm's does not
    rt.begin_step(["x"], [2], [0], [2])
    assert not any(d.abs().any() for d in run_step(rt, h).values())
    assert rt.decision("x").fired is False


def test_routing_rows_of_one_step_route_apart_and_share_category_slots():
    rt = routing_runtime()
    rt.add_request("a", routed())
    rt.add_request("b", routed())
    rt.add_request("explicit", routed(["y"]))  # shares the routing requests' slot for y (same steering)
    assert rt.slots_in_use == 4
    h = torch.cat([GATE * 3 + torch.zeros(2, D), -GATE * 3 + torch.zeros(2, D), GATE * 3 + torch.zeros(2, D)])
    rt.begin_step(["a", "b", "explicit"], [2, 2, 2], [0, 0, 0], [2, 2, 2])
    deltas = run_step(rt, h)
    for row, category in ((1, "y"), (3, "z"), (5, "y")):
        expected = reference_op(ROUTED, routed([category]), 3)(h[row : row + 1]) - h[row : row + 1]
        torch.testing.assert_close(deltas[3][row : row + 1], expected, rtol=1e-5, atol=1e-5)
    for req in ("a", "b", "explicit"):
        rt.remove_request(req)
    assert rt.slots_in_use == 0


def test_a_routing_request_that_finds_too_few_slots_holds_none():
    rt = routing_runtime(max_slots=4)
    rt.add_request("other", steer("add"))
    rt.add_request("x", routed(["x"]))
    with pytest.raises(runtime_mod.SlotsExhaustedError):
        rt.add_request("r", routed())  # its own slot, y and z (x is shared): 2 + 3 > 4
    assert rt.slots_in_use == 2 and not rt.is_bound("r")
    rt.remove_request("other")
    rt.add_request("r", routed())
    assert rt.slots_in_use == 4


def test_the_padded_evaluation_routes_as_the_host_sized_one(monkeypatch):
    def run(capturing: bool):
        monkeypatch.setattr(runtime_mod, "_capturing_cuda_graph", lambda h: capturing)
        rt = routing_runtime()
        rt.add_request("a", routed())
        rt.add_request("b", routed())
        rt.begin_step(["a", "b"], [3, 3], [0, 0], [3, 3])
        h = torch.cat([hidden(True, 3), hidden(False, 3)])
        return run_step(rt, h), rt.gate_decisions("")

    host, captured = run(False), run(True)
    for layer in range(4):  # two category slots at a site: the short path vs the captured general op (rounding)
        torch.testing.assert_close(host[0][layer], captured[0][layer], rtol=1e-6, atol=1e-6)
    assert host[1] == captured[1] and [r["category"] for r in host[1]] == ["y", "z"]
