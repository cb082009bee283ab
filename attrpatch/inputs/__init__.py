"""Stage 1, inputs: the prompts and the conventions about them. No model here.

    pairs          PromptPair: a clean and a corrupt prompt of one token length, answers, roles; JSONL files
    tasks          the built-in tasks (ioi, facts, induction) and their prompt pairs
    tokenization   encoding prompts as the model was trained on them: BOS, roles, answers of several tokens
    alignment      positions that mean the same token in every prompt (one layout per screen)
    batch          PromptBatch (pairs as right-padded tensors) and RunInput (token ids, embedding noise)
    corruption     the corruptions by name (str, abc, noise) and the Gaussian embedding noise
    directions     the one table of directions: which run is the source and which the receiver
"""
