"""What the programs offer by name, for the command line's choices: light (the programs load torch, this does not)."""

__all__ = ["CURATE_BY", "DEMOS"]

# the demos ``gradindex demo NAME`` runs
DEMOS: dict[str, str] = {
    "digits": "an MLP on sklearn's digits with 10% flipped labels (the default)",
    "gpt2": "a tiny GPT-2 on procedural text with 10% corrupted sentences, through the hf-causal-lm task",
}
# the scores ``gradindex curate --drop-top`` ranks by
CURATE_BY = ("self-influence",)
