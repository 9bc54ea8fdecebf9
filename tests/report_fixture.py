"""A small but realistic run folder for the report tests, built from the schema classes.

Reference + two variants (int8-wo: complete, QUANTIZE; nf4: partial, DON'T QUANTIZE, OOM at
batch 8) + one failed variant (hqq-2bit), six items, one warning, and untrusted text: a question
with ``<script>alert(1)</script>`` and ``&``, a generated text with an ``<img onerror>``.

The numbers are computed from the per-item answers (Wilson intervals, exact McNemar, bootstrap
means) so the files agree with each other as a real run's would. To test against a real run
instead, make `build_run_folder` copy that run's folder into `path`; the tests derive what they
expect from the files, except that they look for `XSS_QUESTION_MARKER` in dataset.jsonl.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from quantcheck.analysis.recommend import recommend
from quantcheck.schema.results import (
    Accuracy,
    CostComparison,
    DatasetInfo,
    DivergenceSummary,
    Estimate,
    GeneratedAnswer,
    GenerationCost,
    GenerationSettings,
    GenerativeQuality,
    Interval,
    ItemRecord,
    LatencyPoint,
    LoglikAnswer,
    ModelCost,
    ModelInfo,
    ModelResult,
    PairedComparison,
    PrecisionInfo,
    Results,
    RunWarning,
    TokenAgreement,
    Verdict,
    WeightMemory,
)

XSS_QUESTION_MARKER = "<script>alert(1)</script>"
KS = (1, 2, 3, 5, 10, 20)
LETTERS = "ABCD"

DATASET = [
    {
        "item_id": "mmlu-abstract_algebra-0007",
        "subject": "abstract_algebra",
        "question": "Find the order of the factor group Z_6/<3>.",
        "choices": ["2", "3", "6", "12"],
        "answer": "B",
    },
    {
        "item_id": "mmlu-college_chemistry-0012",
        "subject": "college_chemistry",
        "question": "Which of the following is the strongest acid in water?",
        "choices": ["HF", "HCl", "HClO4", "CH3COOH"],
        "answer": "C",
    },
    {
        "item_id": "mmlu-computer_security-0031",
        "subject": "computer_security",
        "question": (
            "A web page shows the user comment " + XSS_QUESTION_MARKER + " & nothing else. "
            "Which defense stops the script from running?"
        ),
        "choices": [
            'Escaping <, > & " before inserting user text into HTML',
            "Using HTTPS & HSTS",
            "Hashing passwords with bcrypt",
            "Rate limiting the login form",
        ],
        "answer": "A",
    },
    {
        "item_id": "mmlu-high_school_physics-0044",
        "subject": "high_school_physics",
        "question": "A car accelerates from rest at 2 m/s^2. How far does it travel in 5 s?",
        "choices": ["10 m", "20 m", "50 m", "25 m"],
        "answer": "D",
    },
    {
        "item_id": "mmlu-marketing-0003",
        "subject": "marketing",
        "question": "Which pricing strategy sets a low initial price to gain market share quickly?",
        "choices": ["Skimming", "Penetration pricing", "Premium pricing", "Cost-plus pricing"],
        "answer": "B",
    },
    {
        "item_id": "mmlu-world_religions-0019",
        "subject": "world_religions",
        "question": "What is the sacred text of Sikhism?",
        "choices": ["Guru Granth Sahib", "Vedas", "Tripitaka", "Avesta"],
        "answer": "A",
    },
]

# Log-likelihood answers per model (same order as DATASET).
LOGLIK = {
    "reference": ["B", "C", "B", "D", "B", "C"],
    "int8-wo": ["B", "C", "B", "D", "B", "A"],  # wrong -> right on the last item
    "nf4": ["B", "D", "B", "A", "B", "C"],  # right -> wrong on items 2 and 4
}
# Generated texts (nf4's generative pass never ran: it is a partial variant).
GENERATED = {
    "reference": [
        "The answer is B.",
        "C. HClO4 (perchloric acid) is the strongest.",
        "A",
        "Answer: D",
        "I cannot decide between the options.",
        "The answer is C, the Vedas... no wait.",
    ],
    "int8-wo": [
        "The answer is B.",
        "C. HClO4 (perchloric acid) is the strongest.",
        "A",
        "Answer: D",
        "B <img src=x onerror=alert(2)> penetration pricing",
        "The answer is C, the Vedas... no wait.",
    ],
}
GEN_PRED = {
    "reference": ["B", "C", "A", "D", None, "C"],
    "int8-wo": ["B", "C", "A", "D", "B", "C"],
}
KL = {
    "int8-wo": [0.0009, 0.0021, 0.0004, 0.0013, 0.0035, 0.0188],
    "nf4": [0.041, 0.386, 0.072, 0.291, 0.055, 0.118],
}

GIB = 1024**3
PARAMS = 1_100_048_384


# ------------------------------------------------------------------------------------ statistics


def wilson(correct: int, n: int, z: float = 1.959964) -> Interval:
    if n == 0:
        return Interval(low=0.0, high=1.0, method="wilson")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(low=max(0.0, center - half), high=min(1.0, center + half), method="wilson")


def accuracy(correct_flags: list[bool]) -> Accuracy:
    n, c = len(correct_flags), sum(correct_flags)
    return Accuracy(n=n, correct=c, accuracy=c / n, ci=wilson(c, n))


def mcnemar_exact(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(ref_ok: list[bool], var_ok: list[bool], ref_pred: list, var_pred: list) -> PairedComparison:
    n = len(ref_ok)
    rw = sum(1 for r, v in zip(ref_ok, var_ok) if r and not v)
    wr = sum(1 for r, v in zip(ref_ok, var_ok) if not r and v)
    diff = (sum(var_ok) - sum(ref_ok)) / n
    # Paired Wald interval on the per-item differences (fine for a fixture).
    d = [int(v) - int(r) for r, v in zip(ref_ok, var_ok)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    half = 1.959964 * math.sqrt(var / n) if n else 1.0
    return PairedComparison(
        n=n,
        reference_accuracy=sum(ref_ok) / n,
        variant_accuracy=sum(var_ok) / n,
        difference=diff,
        difference_ci=Interval(low=max(-1.0, diff - half), high=min(1.0, diff + half), method="paired wald"),
        right_to_wrong=rw,
        wrong_to_right=wr,
        mcnemar_p=mcnemar_exact(rw, wr),
        answer_agreement=sum(1 for a, b in zip(ref_pred, var_pred) if a == b) / n,
        min_detectable_difference=2.8 * math.sqrt(max((rw + wr) / n, 1 / n) / n),
    )


def bootstrap_mean(values: list[float], seed: int = 0, reps: int = 2000) -> Estimate:
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(reps))
    return Estimate(
        value=sum(values) / n,
        ci=Interval(low=means[int(0.025 * reps)], high=means[int(0.975 * reps) - 1], method="bootstrap percentile"),
    )


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------- builders


def _jaccard_per_item(kl_values: list[float]) -> list[dict[int, float]]:
    """Plausible Jaccard@k per item: more divergence, less overlap; deeper k, less overlap."""
    out = []
    for kl in kl_values:
        row = {}
        for k in KS:
            if k == 1:  # one token each: the same token or not
                row[k] = 1.0 if kl < 0.1 else 0.0
                continue
            drop = min(0.9, 0.9 * kl + 0.012 * math.log2(k) * (1 + 8 * kl))
            row[k] = round(max(0.0, 1 - drop), 4)
        out.append(row)
    return out


def _agreement(name: str) -> tuple[TokenAgreement, list[dict[int, float]], list[bool]]:
    kl = KL[name]
    jac = _jaccard_per_item(kl)
    top1 = [j[1] == 1.0 for j in jac]
    n = len(kl)
    agreement = TokenAgreement(
        n=n,
        jaccard={k: bootstrap_mean([j[k] for j in jac], seed=k) for k in KS},
        top1_agreement=Estimate(value=sum(top1) / n, ci=wilson(sum(top1), n)),
        kl=DivergenceSummary(
            mean=bootstrap_mean(kl, seed=99), median=quantile(kl, 0.5), p90=quantile(kl, 0.9), max=max(kl)
        ),
    )
    return agreement, jac, top1


def _settings() -> GenerationSettings:
    return GenerationSettings(
        prompt_style="chat-template",
        temperature=0.0,
        greedy=True,
        max_new_tokens=32,
        seed=1234,
        instruction="Answer with the letter of the correct choice.",
    )


SECONDS_PER_TOKEN = {"reference": 0.021, "int8-wo": 0.027}


def _generative(name: str) -> GenerativeQuality:
    preds = GEN_PRED[name]
    ok = [p == d["answer"] for p, d in zip(preds, DATASET)]
    words = [len(t.split()) for t in GENERATED[name]]
    tokens = [max(1, int(w * 1.4)) for w in words]
    secs = [0.05 + SECONDS_PER_TOKEN[name] * t for t in tokens]
    return GenerativeQuality(
        accuracy=accuracy(ok),
        unparsable=sum(1 for p in preds if p is None),
        words_per_minute=sum(words) / sum(secs) * 60,
        tokens_per_second=sum(tokens) / sum(secs),
        mean_output_tokens=sum(tokens) / len(tokens),
        mean_output_words=sum(words) / len(words),
        settings=_settings(),
    )


def _latency(
    medians: list[float], peaks: list[float], statuses: list[str], noisy_at: int | None = None
) -> list[LatencyPoint]:
    pts = []
    for bs, med, peak, status in zip((1, 2, 4, 8), medians, peaks, statuses):
        if status == "oom":
            pts.append(
                LatencyPoint(
                    batch_size=bs,
                    seq_len=512,
                    status="oom",
                    error="CUDA out of memory. Tried to allocate 1.20 GiB (GPU 0; 22.19 GiB total capacity)",
                )
            )
            continue
        noisy = bs == noisy_at
        spread = 0.25 if noisy else 0.04
        pts.append(
            LatencyPoint(
                batch_size=bs,
                seq_len=512,
                status="ok",
                iterations=30,
                median_s=med,
                p10_s=med * (1 - spread / 2),
                p90_s=med * (1 + spread),
                cv=spread / 2,
                noisy=noisy,
                tokens_per_s=bs * 512 / med,
                peak_memory_bytes=int(peak * GIB),
            )
        )
    return pts


def _cost(weight_bytes: int, bits: float, medians, peaks, statuses, decode_tps: float, noisy_at=None) -> ModelCost:
    return ModelCost(
        memory_method="torch.cuda.max_memory_allocated",
        threads=8,
        load_time_s=4.2 + weight_bytes / GIB,
        load_peak_memory_bytes=int(weight_bytes * 1.08),
        weights=WeightMemory(
            counted_bytes=weight_bytes,
            footprint_bytes=weight_bytes,
            parameters=PARAMS,
            bits_per_parameter=bits,
            footprint_agrees=True,
        ),
        latency=_latency(medians, peaks, statuses, noisy_at),
        generation=GenerationCost(
            prompts=8,
            new_tokens=64,
            prefill_s=0.09,
            time_to_first_token_s=0.11,
            decode_tokens_per_s=decode_tps,
            tokens_per_s=decode_tps * 0.93,
            peak_memory_bytes=int(peaks[0] * GIB),
        ),
    )


def build_results() -> tuple[Results, list[ItemRecord]]:
    answers = [d["answer"] for d in DATASET]
    ok = {m: [p == a for p, a in zip(preds, answers)] for m, preds in LOGLIK.items()}

    ref_cost = _cost(2 * PARAMS, 16.0, [0.021, 0.038, 0.071, 0.139], [2.31, 2.52, 2.95, 3.81], ["ok"] * 4, 41.3)
    int8_cost = _cost(
        int(1.13 * PARAMS), 8.22, [0.026, 0.044, 0.083, 0.171], [1.33, 1.55, 1.98, 2.86], ["ok"] * 4, 33.8, noisy_at=8
    )
    nf4_cost = _cost(
        int(0.62 * PARAMS), 4.51, [0.034, 0.061, 0.118, 0.0], [0.86, 1.31, 2.44, 0.0], ["ok", "ok", "ok", "oom"], 29.1
    )

    def cvr(cost: ModelCost) -> CostComparison:
        ratio = cost.weights.counted_bytes / ref_cost.weights.counted_bytes
        lat = {}
        for p in cost.latency:
            rp = next(q for q in ref_cost.latency if q.batch_size == p.batch_size)
            if p.status == "ok" and rp.status == "ok":
                lat[p.batch_size] = p.median_s / rp.median_s
        return CostComparison(
            weight_memory_ratio=ratio,
            memory_saving=1 - ratio,
            latency_ratio=lat,
            decode_speedup=cost.generation.decode_tokens_per_s / ref_cost.generation.decode_tokens_per_s,
        )

    int8_agree, int8_jac, int8_top1 = _agreement("int8-wo")
    nf4_agree, nf4_jac, nf4_top1 = _agreement("nf4")

    reference = ModelResult(
        name="reference",
        quant=None,
        description="TinyLlama-1.1B-Chat in bfloat16 (no quantization)",
        status="ok",
        precision=PrecisionInfo(
            parameter_dtypes={"bfloat16": PARAMS}, devices=["cuda:0"], compute_dtype="bfloat16", offloaded=False
        ),
        loglik=accuracy(ok["reference"]),
        generative=_generative("reference"),
        cost=ref_cost,
    )
    int8 = ModelResult(
        name="int8-wo",
        quant="torchao:int8_weight_only",
        description="torchao int8 weight-only, bfloat16 activations",
        status="ok",
        precision=PrecisionInfo(
            parameter_dtypes={"int8": 968_884_224, "bfloat16": 131_164_160},
            devices=["cuda:0"],
            compute_dtype="bfloat16",
            offloaded=False,
        ),
        loglik=accuracy(ok["int8-wo"]),
        generative=_generative("int8-wo"),
        agreement=int8_agree,
        paired_loglik=paired(ok["reference"], ok["int8-wo"], LOGLIK["reference"], LOGLIK["int8-wo"]),
        paired_generative=paired(
            [p == a for p, a in zip(GEN_PRED["reference"], answers)],
            [p == a for p, a in zip(GEN_PRED["int8-wo"], answers)],
            GEN_PRED["reference"],
            GEN_PRED["int8-wo"],
        ),
        cost=int8_cost,
        cost_vs_reference=cvr(int8_cost),
        verdict=Verdict(
            decision="QUANTIZE",
            reasons=[
                f"saves {100 * (1 - 1.13 / 2):.1f}% of weight memory (threshold 20.0%)",
                f"mean KL {int8_agree.kl.mean.value:.4f} nats is below 0.05",
                "no accuracy loss detected: +16.7 pts, McNemar p 1.000",
            ],
            summary="int8 weight-only keeps the reference's answers and halves weight memory.",
            fail_level=1 - 0.05 / 4,
            checks={
                "memory": "pass",
                "log-likelihood accuracy": "pass",
                "generated-answer accuracy": "pass",
                "mean KL": "pass",
                "top-1 agreement": "pass",
            },
        ),
    )
    nf4 = ModelResult(
        name="nf4",
        quant="bnb:nf4",
        description="bitsandbytes NF4 4-bit, bfloat16 compute",
        status="partial",
        errors=["generative scoring skipped: the run was interrupted (SIGTERM) before the generation pass"],
        precision=PrecisionInfo(
            parameter_dtypes={"uint8": 484_442_112, "bfloat16": 131_164_160},
            devices=["cuda:0"],
            compute_dtype="bfloat16",
            offloaded=False,
        ),
        loglik=accuracy(ok["nf4"]),
        agreement=nf4_agree,
        paired_loglik=paired(ok["reference"], ok["nf4"], LOGLIK["reference"], LOGLIK["nf4"]),
        cost=nf4_cost,
        cost_vs_reference=cvr(nf4_cost),
        verdict=Verdict(
            decision="DON'T QUANTIZE",
            reasons=[
                f"mean KL {nf4_agree.kl.mean.value:.3f} nats exceeds the 0.05 threshold",
                f"top-1 agreement {nf4_agree.top1_agreement.value * 100:.1f}% is below 90%",
                "accuracy dropped by 33.3 pts (2 right-to-wrong flips)",
            ],
            summary="NF4 changes the next-token distribution too much for this model.",
            fail_level=1 - 0.05 / 3,
            checks={"memory": "pass", "log-likelihood accuracy": "fail", "mean KL": "fail", "top-1 agreement": "fail"},
        ),
    )
    hqq = ModelResult(
        name="hqq-2bit",
        quant="hqq:2bit",
        description="HQQ 2-bit, group size 64",
        status="failed",
        errors=["QuantMethodError: hqq 2-bit kernels are not available for this GPU (needs compute capability 8.0)"],
    )

    results = Results(
        tool_version="0.1.0",
        created_at="2025-11-27T10:42:13+00:00",
        finished=True,
        environment={
            "python": "3.11.7",
            "torch": "2.4.1+cu121",
            "transformers": "4.46.3",
            "bitsandbytes": "0.45.0",
            "torchao": "0.10.0",
            "platform": "Linux-5.15.0-1051-aws-x86_64",
            "gpu": "NVIDIA A10G (22.19 GiB)",
            "cuda": "12.1",
        },
        config={
            "seed": 1234,
            "batch_sizes": [1, 2, 4, 8],
            "seq_len": 512,
            "bootstrap": 2000,
            "variants": ["int8-wo", "nf4", "hqq-2bit"],
        },
        model=ModelInfo(
            name="TinyLlama-1.1B-Chat-v1.0",
            source="hub",
            path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            revision="fe8a4ea1ffedaf415f4da2f062534de366a451e6",
            reference_dtype="bfloat16",
            device="cuda:0 (NVIDIA A10G)",
        ),
        dataset=DatasetInfo(
            spec="mmlu-mini:6",
            n_items=len(DATASET),
            subjects=sorted({d["subject"] for d in DATASET}),
            source="builtin",
            content_hash="sha256:5f0c1e9a7d2b4c6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f3a5b7c9d1e",
            prompt_format="question, lettered choices A-D, then 'Answer:'",
            answer_continuations=[" A", " B", " C", " D"],
        ),
        models=[reference, int8, nf4, hqq],
        warnings=[
            RunWarning(
                code="noisy-timing",
                message="int8-wo latency at batch 8 varied by 25% between iterations (cv 0.125); compare it with care.",
                model="int8-wo",
            )
        ],
        missing=["generative:nf4", "all:hqq-2bit"],
    )

    items: list[ItemRecord] = []
    agree_info = {"int8-wo": (int8_jac, int8_top1), "nf4": (nf4_jac, nf4_top1)}
    rng = random.Random(7)
    for name in ("reference", "int8-wo", "nf4"):
        for i, d in enumerate(DATASET):
            pred = LOGLIK[name][i]
            logprobs = [round(-rng.uniform(0.3, 4.0), 3) for _ in LETTERS]
            logprobs[LETTERS.index(pred)] = round(-rng.uniform(0.05, 0.25), 3)
            rec = ItemRecord(
                item_id=d["item_id"],
                model=name,
                answer=d["answer"],
                loglik=LoglikAnswer(pred=pred, correct=pred == d["answer"], choice_logprobs=logprobs),
                topk_ids=[319 + LETTERS.index(pred), 350, 315, 360, 29871],
                topk_logprobs=sorted(logprobs, reverse=True) + [-6.5],
            )
            if name in GENERATED:
                gp = GEN_PRED[name][i]
                text = GENERATED[name][i]
                toks = max(1, int(len(text.split()) * 1.4))
                rec.generative = GeneratedAnswer(
                    text=text,
                    pred=gp,
                    correct=gp == d["answer"],
                    new_tokens=toks,
                    seconds=0.05 + SECONDS_PER_TOKEN[name] * toks,
                )
            if name in agree_info:
                jac, top1 = agree_info[name]
                rec.kl = KL[name][i]
                rec.jaccard = jac[i]
                rec.top1_agree = top1[i]
            items.append(rec)
    results.recommendation = recommend(results)  # as summarize does, last
    return results, items


def build_run_folder(path: Path) -> Path:
    """Write results.json, items.jsonl and dataset.jsonl of a complete run into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    results, items = build_results()
    (path / "results.json").write_text(results.model_dump_json(indent=2), encoding="utf-8")
    (path / "items.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in items), encoding="utf-8")
    (path / "dataset.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DATASET), encoding="utf-8")
    return path


def build_partial_run_folder(path: Path) -> Path:
    """Only results.json, written early in a run: cost measured for the reference, nothing else."""
    path.mkdir(parents=True, exist_ok=True)
    full, _ = build_results()
    ref = full.models[0].model_copy(update={"loglik": None, "generative": None, "status": "partial"})
    pending = [
        ModelResult(name=m.name, quant=m.quant, description=m.description, status="pending") for m in full.models[1:]
    ]
    results = full.model_copy(
        update={
            "finished": False,
            "models": [ref, *pending],
            "warnings": [],
            "missing": ["accuracy", "agreement", "cost:int8-wo", "cost:nf4", "cost:hqq-2bit", "verdicts"],
            "recommendation": None,  # made by summarize at the end of a run: the report makes it from the verdicts
        }
    )
    (path / "results.json").write_text(results.model_dump_json(indent=2), encoding="utf-8")
    return path
