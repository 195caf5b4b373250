"""Personal concepts ("our dog Rex") learned from a few example images, over the vectors the store holds.

Two few-shot methods from the CLIP literature, both on frozen features, so learning takes seconds and no
stored image is encoded again:

- **linear probe** (Radford et al. 2021): L2-regularised logistic regression on the L2-normalised image
  vectors. The regularisation strength C is chosen by stratified k-fold cross-validation when every class
  has at least `CV_MIN_PER_CLASS` examples, else `DEFAULT_C` is used. A probe concept scores an image with
  `sigmoid(w . v + b)`, the probability that it shows the concept.
- **CoOp** (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): `n_ctx` learnable context
  vectors stand where the first words of a prompt would be, in front of the class name ("[V1]..[V4] rex.",
  class token at the end), initialised from the embeddings of "a photo of a" (the paper's best variant).
  The text tower runs on those embeddings with every weight frozen; only the context is trained, with
  cross-entropy over the classes' `logit_scale x cosine`. Given the classes' prompt-ensembled zero-shot vectors
  (class names the model knows, as in `benchmarks/few_shot.py`), it starts from them and is kept near them
  (KgCoOp, see `coop`), so that a few examples refine the zero-shot classifier instead of replacing it. The
  result is a text-side unit vector, stored with the concept, which a query combines like the vector of a text.

One concept from positives against negatives ("rex" against everything else) is a two-class problem. Its
background class is a second learned prompt, with its own context and the class token "thing" (CoOp's
class-specific context). Both prompts are trained; the two-way softmax over them is
`sigmoid(logit_scale x (prompt - background) . v)`, so the concept keeps `w = logit_scale x (prompt -
background)`, a difference of two text-side vectors, as its vector: a search ranking by its direction ranks by
the probability the concept was trained to give (ranking by the prompt's vector alone does not: it was
only ever compared with the background's). Both prompts' unit vectors are kept in its parameters. Its CoOp is
not kept near zero-shot: neither a personal name nor "thing" has zero-shot knowledge worth keeping (kept near
them, a concept learned as "reds" from 4 red images put no red image in its top 3, against 2 without).

Without given negatives, `NEGATIVES_PER_POSITIVE` times as many negatives (at least
`MIN_SAMPLED_NEGATIVES`) are drawn from the store at random with the concept's seed, never among the
positives.

Held-out accuracy: a seeded stratified split keeps `HOLDOUT_SHARE` of each class (at least one example)
out of training; a model fitted on the rest is scored on it (balanced accuracy: the mean of the classes'
recalls, since sampled negatives outnumber positives). The concept itself is then fitted on every example.
`auto` fits both methods and keeps the one with the better held-out accuracy, CoOp on a tie and when no class
has two examples to split (CoOp does better than a probe with one or two shots).

Concepts live in the store directory, in a LanceDB table of their own beside the model's image table
(`ConceptBook`), with the model identity recorded in each row: a concept is never applied to another
model's vectors.

Modules: `concept` (the record), `probe`, `coop`, `learn` (one concept: split, auto, sampling), `book` (storage,
`@name` terms, tagging). Their public names are re-exported here.
"""

from retrieval.concepts.book import ConceptBook, resolve_terms, tag_concept
from retrieval.concepts.concept import METHODS, NAME_PATTERN, Concept, Method, check_name
from retrieval.concepts.coop import (
    ANCHOR_TEMPLATES,
    ANCHOR_WEIGHT,
    CONTEXT_INIT,
    DEFAULT_LR,
    DEFAULT_N_CTX,
    DEFAULT_STEPS,
    CoopFit,
    anchor_weight_for,
    prompt_vectors,
    train_coop,
    zero_shot_anchor,
)
from retrieval.concepts.learn import (
    BACKGROUND_TOKEN,
    HOLDOUT_SHARE,
    MIN_SAMPLED_NEGATIVES,
    NEGATIVES_PER_POSITIVE,
    held_out_accuracies,
    holdout_split,
    learn_concept,
    negatives_wanted,
    pick_method,
    sample_negatives,
)
from retrieval.concepts.probe import (
    C_GRID,
    CV_FOLDS,
    CV_MIN_PER_CLASS,
    DEFAULT_C,
    ProbeFit,
    balanced_accuracy,
    choose_c,
    fit_logistic,
    train_probe,
)

__all__ = [
    "ANCHOR_TEMPLATES",
    "ANCHOR_WEIGHT",
    "BACKGROUND_TOKEN",
    "CONTEXT_INIT",
    "CV_FOLDS",
    "CV_MIN_PER_CLASS",
    "C_GRID",
    "DEFAULT_C",
    "DEFAULT_LR",
    "DEFAULT_N_CTX",
    "DEFAULT_STEPS",
    "HOLDOUT_SHARE",
    "METHODS",
    "MIN_SAMPLED_NEGATIVES",
    "NAME_PATTERN",
    "NEGATIVES_PER_POSITIVE",
    "Concept",
    "ConceptBook",
    "CoopFit",
    "Method",
    "ProbeFit",
    "anchor_weight_for",
    "balanced_accuracy",
    "check_name",
    "choose_c",
    "fit_logistic",
    "held_out_accuracies",
    "holdout_split",
    "learn_concept",
    "negatives_wanted",
    "pick_method",
    "prompt_vectors",
    "resolve_terms",
    "sample_negatives",
    "tag_concept",
    "train_coop",
    "train_probe",
    "zero_shot_anchor",
]
