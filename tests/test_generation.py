"""Generation: `model.generate(...)` with per-step interventions, reference and compiled."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import GEN_PROMPTS as PROMPTS
from helpers import WORDS, endless, layers, layers_of
from hypothesis import given, settings
from hypothesis import strategies as st

import interp_dsl
from interp_dsl import InterventionError
from runtime.decode_compiled import CACHE_BUCKET


@pytest.fixture(params=["gpt2", "llama"])
def gen(request):
    return endless(request.param)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def shared_gen(request):
    """One model for all examples of a property test (compiled graphs accumulate on it)."""
    return endless(request.param)


def embed(model):
    return model.transformer.wte if hasattr(model.module, "transformer") else model.model.embed_tokens


def no_cache_loop(module, enc, steps, hooks=()):
    """Greedy decoding written by hand: the whole sequence every step, no KV cache, `hooks` as
    (module, fn(step, prompt_length, output) -> output|None) applied in every forward."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    prompt = ids.shape[1]
    captured = []
    for step in range(steps):
        handles = [m.register_forward_hook(lambda mod, a, o, fn=fn, step=step: fn(step, prompt, o))
                   for m, fn in hooks]
        try:
            with torch.no_grad():
                logits = module(input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        finally:
            for h in handles:
                h.remove()
        captured.append(logits)
        token = logits[:, -1].argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
    return ids, captured


def test_plain_generation_equals_hf_generate(gen):
    enc = gen.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with gen.generate(PROMPTS, max_new_tokens=6):
        out = gen.generator.output.save()
    expected = gen.module.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out.value, expected)


def test_steering_every_step_equals_a_loop_without_cache(gen):
    """The KV cache keeps earlier steps' edited states; a no-cache loop must edit every position
    that was the last one in some step so far."""
    torch.manual_seed(1)
    vec = torch.randn(32)
    with gen.generate(PROMPTS, max_new_tokens=5) as tracer:
        with tracer.all():
            layers(gen)[1].output[:, -1, :] += 2.0 * vec
            hidden = layers(gen)[2].output.save()
        out = gen.generator.output.save()

    states = []

    def steer(step, prompt, output):
        output = output.clone()
        output[:, prompt - 1:, :] += 2.0 * vec
        return output

    def capture(step, prompt, output):
        states.append(output[:, -1].clone())

    enc = gen.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    module_layers = layers_of(gen.module)
    ids, _ = no_cache_loop(gen.module, enc, 5, [(module_layers[1], steer), (module_layers[2], capture)])
    assert torch.equal(out.value, ids)
    assert isinstance(hidden.value, list) and len(hidden.value) == 5
    assert hidden.value[0].shape[1] == enc["input_ids"].shape[1] and hidden.value[1].shape[1] == 1
    for step, value in enumerate(hidden.value):
        torch.testing.assert_close(value[:, -1], states[step], atol=1e-5, rtol=1e-5)


def test_iter_chooses_steps_and_next_walks_them(gen):
    with gen.generate(PROMPTS[0], max_new_tokens=5) as tracer:
        with tracer.iter[2:4]:
            layers(gen)[0].output[:] = 0
            zeroed = layers(gen)[0].output.save()
        first = gen.lm_head.output.save()
        second = gen.lm_head.next().output.save()
        third = gen.lm_head.next().output.save()
        out = gen.generator.output.save()
    assert [z.abs().max().item() for z in zeroed.value] == [0.0, 0.0]
    assert first.shape[1] == 1 and second.shape[1] == 1  # logits at the last position only
    ids = out.value
    prompt = ids.shape[1] - 5
    for step, logits in enumerate((first, second, third)):
        assert logits.value[0, -1].argmax().item() == ids[0, prompt + step].item()

    def zero_steps(step, prompt_len, output):  # steps 2 and 3 saw zeros at their new positions
        output = output.clone()
        if step >= 2:
            output[:, prompt_len + 1: prompt_len + min(step, 3)] = 0
        return output

    enc = gen.tokenizer(PROMPTS[0], return_tensors="pt")
    expected, _ = no_cache_loop(gen.module, enc, 5, [(layers_of(gen.module)[0], zero_steps)])
    assert torch.equal(ids, expected)


def test_invokes_generate_as_one_batch_and_cross_prompt_writes(gen):
    with gen.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("madison square garden is located in the city of new"):
            embeddings = embed(gen).output
            first = gen.generator.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):  # ten words, as many as the first
            embed(gen).output = embeddings
            second = gen.generator.output.save()  # an invoke's own rows, as in nnsight 0.8
    assert first.value.shape == second.value.shape == (1, 10 + 3)
    assert torch.equal(first.value[0, -3:], second.value[0, -3:])  # the second prompt continues the first


def test_saved_list_collects_one_value_per_step(gen):
    with gen.generate(PROMPTS[0], max_new_tokens=4, compile="off") as tracer:
        states = interp_dsl.list().save()
        with tracer.all():
            states.append(layers(gen)[-1].output)
    # the reference: a hook on the same layer during HF's own greedy generate
    module, seen = gen._engine.module, []
    last = module.transformer.h[-1] if hasattr(module, "transformer") else module.model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        enc = gen.tokenizer(PROMPTS[0], return_tensors="pt")
        module.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=gen.tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert len(states) == len(seen) == 4 and [s.shape[1] for s in states][1:] == [1, 1, 1]
    for state, expected in zip(states, seen, strict=True):
        torch.testing.assert_close(state, expected)


def test_sampling_is_seeded(gen):
    def sample(**kwargs):
        with gen.generate(PROMPTS, max_new_tokens=8, do_sample=True, **kwargs):
            out = gen.generator.output.save()
        return out.value

    a, b = sample(seed=3, temperature=1.5), sample(seed=3, temperature=1.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(seed=4, temperature=1.5))
    with gen.generate(PROMPTS, max_new_tokens=8):
        greedy = gen.generator.output.save()
    assert torch.equal(sample(seed=5, top_k=1), greedy.value)
    assert torch.equal(sample(seed=5, top_p=1e-6), greedy.value)


def test_generation_stops_when_every_row_ends(llama):
    """HF's rule: after EOS a row continues with padding; the loop ends when every row has."""
    enc = llama.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        eos = int(llama.module(**enc).logits[0, -1].argmax())
    llama.module.config.eos_token_id = eos
    with llama.generate(PROMPTS, max_new_tokens=6) as tracer:
        with tracer.all():
            last = llama.model.layers[0].output.save()
        out = llama.generator.output.save()
    expected = llama.module.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(out.value, expected)
    assert len(last.value) == out.value.shape[1] - enc["input_ids"].shape[1]


@pytest.mark.parametrize("mode", ["graph"])
def test_compiled_generation_equals_reference(gen, mode):
    torch.manual_seed(2)
    vec = torch.randn(32)

    def experiment(compile):
        with gen.generate(max_new_tokens=6, compile=compile) as tracer:
            with tracer.invoke(PROMPTS[0]):
                with tracer.all():
                    layers(gen)[1].output[:, -1, :] += 0.7 * vec
                    logits = gen.lm_head.output.save()
                with tracer.iter[2:4]:
                    layers(gen)[0].output[:] = layers(gen)[0].output * 0.5
            with tracer.invoke(PROMPTS[1]):
                with tracer.iter[[1, 5]]:
                    mlp = (layers(gen)[2].mlp.output).save()
                out = gen.generator.output.save()
        return out.value, logits.value, mlp.value

    reference = experiment("off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = experiment(mode)
    assert torch.equal(reference[0], compiled[0])
    for ref, got in zip([*reference[1], *reference[2]], [*compiled[1], *compiled[2]], strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    stats = gen.compile_stats()
    assert stats.fallbacks == 0 and stats.calls == 5
    # three step programs (steering; steering + halving; steering + saving invoke 1's mlp)
    assert stats.compilations == 3


def test_compilations_are_bounded_by_buckets(llama):
    """100 prompts x 20 tokens in batches of 8: one compilation per (batch size, cache length)."""
    llama.module.config.eos_token_id = None
    rng = torch.Generator().manual_seed(0)
    words = list(WORDS)
    prompts = [" ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=rng))
               for n in torch.randint(2, 12, (100,), generator=rng)]
    vec = torch.randn(32, generator=rng)
    buckets = set()
    for start in range(0, 100, 8):
        chunk = prompts[start:start + 8]
        with llama.generate(chunk, max_new_tokens=20, compile="graph") as tracer:
            with tracer.all():
                llama.model.layers[1].output[:, -1, :] += 0.3 * vec
            out = llama.generator.output.save()
        width = out.value.shape[1]
        buckets.add((len(chunk), -(-width // CACHE_BUCKET)))
    stats = llama.compile_stats()
    assert stats.fallbacks == 0 and stats.calls == 13 * 19
    assert stats.compilations == len(buckets) == 2  # exactly one per bucket: batches of 8 and of 4, one cache length


def test_cross_step_flow_falls_back_with_a_reason(gen):
    with pytest.warns(interp_dsl.CompileFallbackWarning, match="flows from one generation step"):
        with gen.generate(PROMPTS[0], max_new_tokens=3, compile="graph") as tracer:
            first = layers(gen)[0].output[:, -1, :]
            with tracer.iter[1:]:
                layers(gen)[0].output[:, -1, :] = first
            out = gen.generator.output.save()
    with gen.generate(PROMPTS[0], max_new_tokens=3) as tracer:
        first = layers(gen)[0].output[:, -1, :]
        with tracer.iter[1:]:
            layers(gen)[0].output[:, -1, :] = first
        expected = gen.generator.output.save()
    assert torch.equal(out.value, expected.value)


def test_generation_errors_name_the_line(gen):
    with pytest.raises(InterventionError, match=r"test_generation.py:\d+.*step 7 does not exist"):
        with gen.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[7]:
                pass
    with pytest.raises(InterventionError, match="did you mean 'max_new_tokens'"):
        gen.generate(PROMPTS[0], max_new_tokenz=3)
    with pytest.raises(InterventionError, match="tracer.iter and tracer.all"):
        with gen.trace(PROMPTS[0]) as tracer:
            with tracer.all():
                pass
    with pytest.raises(InterventionError, match="model.generator.output exists only inside"):
        with gen.trace(PROMPTS[0]):
            gen.generator.output.save()
    with pytest.raises(InterventionError, match="temperature must be > 0"):
        gen.generate(PROMPTS[0], do_sample=True, temperature=0)
    with pytest.raises(interp_dsl.CheckError, match=r"output \(step 3\) does not exist: this generation has 3"):
        with gen.generate(PROMPTS[0], max_new_tokens=3):
            layers(gen)[1].next().next().next().output.save()
    with pytest.raises(interp_dsl.CheckError, match=r"writing .*output \(step 2\): index 2 on dim 1 of size 1"):
        with gen.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[2]:
                layers(gen)[0].output[:, 2] = 0
    with pytest.raises(interp_dsl.CheckError, match=r"test_generation.py:\d+"):
        with gen.generate(PROMPTS[0], max_new_tokens=2) as tracer:
            with tracer.all():
                layers(gen)[0].output[:, :, :3] = torch.zeros(5)


# ---------------------------------------------------------------- differential: compiled vs reference
edits = st.tuples(
    st.sampled_from(["scale", "add", "zero_last", "save"]),
    st.integers(0, 2),  # layer
    st.sampled_from(["all", "first", "late", "some"]),  # which steps
    st.floats(0.25, 2.0, allow_nan=False).map(lambda x: round(x, 2)),
)
SELECT = {"all": slice(None), "first": 0, "late": slice(2, None), "some": [1, 3]}


def generate_with(model, program, compile):
    saved = []
    with model.generate(PROMPTS, max_new_tokens=5, compile=compile) as tracer:
        for kind, layer, steps, value in program:
            with tracer.iter[SELECT[steps]]:
                site = layers(model)[layer]
                if kind == "scale":
                    site.output[:, -1, :] *= value
                elif kind == "add":
                    site.output = site.output + value
                elif kind == "zero_last":
                    site.output[:, -1, :4] = 0
                else:
                    saved.append(site.output[:, -1, :].save())
        ids = model.generator.output.save()
    return ids.value, [v for s in saved for v in s.value]


@settings(max_examples=8, deadline=None)
@given(program=st.lists(edits, min_size=1, max_size=4))
def test_compiled_generation_equals_the_reference(shared_gen, program):
    with warnings.catch_warnings():
        warnings.simplefilter("error", interp_dsl.CompileFallbackWarning)
        ids, saves = generate_with(shared_gen, program, "graph")
    ref_ids, ref_saves = generate_with(shared_gen, program, "off")
    assert torch.equal(ids, ref_ids)
    assert len(saves) == len(ref_saves)
    for got, want in zip(saves, ref_saves, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nnsight_08_spelling_loops_and_tracer_result(gen):
    """nnsight 0.8 writes `for step in tracer.iter[...]:` and reads the ids as `tracer.result`."""
    with gen.generate(PROMPTS, max_new_tokens=4) as tracer:
        hidden, seen = [], []
        for step in tracer.iter[:]:
            layers(gen)[1].output[:, -1, :] *= 0.5
            hidden.append(layers(gen)[2].output[:, -1, :].save("h"))
            seen.append(step)
        ids = tracer.result.save()
    with gen.generate(PROMPTS, max_new_tokens=4) as block:
        with block.all():
            layers(gen)[1].output[:, -1, :] *= 0.5
            same = layers(gen)[2].output[:, -1, :].save("h")
        expected = gen.generator.output.save()
    assert seen == [0, 1, 2, 3]
    assert torch.equal(ids.value, expected.value)
    assert all(torch.equal(a.value, b) for a, b in zip(hidden, same.value, strict=True))
    assert len(tracer.result.saves["h"]) == 4  # one save per step, listed in step order
    assert all(torch.equal(a, b) for a, b in zip(tracer.result.saves["h"], same.value, strict=True))
    with gen.trace(PROMPTS[0]) as trace:
        output = trace.result.save()
        logits = gen.lm_head.output.save()
    assert torch.equal(output.logits, logits.value)


def test_a_generation_is_plain_ir(gen):
    """The settings travel in the IR: JSON round trip, and they are part of the structural hash."""
    from compiler.ir import Generation, dumps, loads

    def record(**settings):
        with gen.generate(PROMPTS[0], **settings) as tracer:
            with tracer.all():
                layers(gen)[0].output[:, -1, :] *= 0.5
            gen.generator.output.save()
        return tracer.program()

    program = record(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9, seed=1)
    assert program.generation == Generation(3, True, 0.7, None, 0.9, 1)
    assert loads(dumps(program)) == program
    hashes = {program.structural_hash(), record(max_new_tokens=3).structural_hash(),
              record(max_new_tokens=3, do_sample=True, temperature=0.8, top_p=0.9, seed=1).structural_hash()}
    assert len(hashes) == 3
    from compiler.printer import format_program
    assert format_program(program).splitlines()[0] == (
        "program v1 invokes=1 generate(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9, seed=1)")


def test_steps_after_the_end_are_reported_not_computed(llama):
    enc = llama.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        llama.module.config.eos_token_id = int(llama.module(**enc).logits[0, -1].argmax())
    with llama.generate(PROMPTS[0], max_new_tokens=4) as tracer:
        first = llama.lm_head.output.save()
        later = llama.lm_head.next().next().output.save()
        collected = interp_dsl.list()
        with tracer.iter[2:]:
            late = llama.model.layers[0].output.save()
            collected.append(llama.model.layers[1].output)
        out = llama.generator.output.save()
    assert out.shape[1] == enc["input_ids"].shape[1] + 1 and first.shape == (1, 1, 64)
    for proxy in (later, late, collected[0]):
        with pytest.raises(interp_dsl.ValueUnavailableError, match="generation ended before its step"):
            proxy.value
