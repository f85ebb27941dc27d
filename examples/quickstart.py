"""Quickstart: read the last hidden state and the logits of the embedded SmolLM2-135M."""

from interp_dsl import LanguageModel

model = LanguageModel("smollm2-135m")  # embedded default, no network
with model.trace("The Eiffel Tower is in the city of"):
    hidden = model.model.layers[-1].output.save()
    logits = model.lm_head.output.save()

print("hidden state:", tuple(hidden.shape))
print("next token:", repr(model.tokenizer.decode(logits[0, -1].argmax())))  # ' Paris'
