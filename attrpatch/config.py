"""Stage 5, config: what a screen is asked to do (``ScreenConfig`` for the node screen, ``EdgeConfig``
for the edge screen) and how its prompts are chosen and encoded (``PromptOptions``, shared by the screen,
the edge screen and the windows), validated when built and never changed after; one serialisation
(:func:`config_dict`). It comes before the analysis, the outputs and both screens, which all read it and
import its types."""

from dataclasses import asdict, dataclass, replace

from .engine.metrics import METRICS, check_metric
from .inputs.corruption import check_corruption
from .inputs.directions import DIRECTIONS, check_direction
from .inputs.tokenization import check_bos_mode
from .methods.ablation import check_ablation
from .methods.edges.eap import EDGE_ESTIMATORS
from .methods.edges.positions import check_positions
from .methods.edges.sources import check_edge_ablation
from .methods.estimators.attribution import ESTIMATORS, check_estimator
from .model.sites import RESID_LIKE, SITES, check_site


def check_metrics_and_direction(config: "ScreenConfig | EdgeConfig", discrete: bool = False) -> None:
    """Validate a screen config's ``metric``, ``metrics`` and ``direction`` (denoise | noise | both), node and
    edge screens alike (:func:`with_primary_metric` adds the primary metric to ``metrics``). The primary
    metric ranks by attribution, so it needs a gradient; ``discrete``: ``metrics`` may hold discrete ones
    (read from the patched runs only)."""
    check_metric(config.metric, gradient=True)
    for m in config.metrics:
        check_metric(m, gradient=not discrete)
    if config.direction != "both":
        check_direction(config.direction)


def with_primary_metric(config: "ScreenConfig | EdgeConfig") -> "ScreenConfig | EdgeConfig":
    """``config`` with its primary metric first in ``metrics`` when missing there: a new config (configs are
    never changed after validation). Every entry point (screen, screen_edges, the pipeline, the CLI) reads
    the config through this."""
    if config.metric in config.metrics:
        return config
    return replace(config, metrics=(config.metric, *config.metrics))


def config_dict(config: "ScreenConfig | EdgeConfig") -> dict:
    """The one serialisation of a config: its fields by name (tuples as lists in JSON). The manifest's
    options, the checkpoint identity (those options less ``progress``), report.json's options and the edge
    report's ``options`` all derive from it."""
    return asdict(config)


POSITIONS = ("default", "each", "all")
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")


@dataclass(frozen=True, kw_only=True)
class ScreenConfig:
    sites: tuple[str, ...] = DEFAULT_SITES
    metric: str = "logit_diff"
    metrics: tuple[str, ...] = METRICS
    direction: str = "denoise"  # denoise | noise | both
    top_k: int | None = 30  # None: verify every component (the exhaustive sweep)
    random_k: int = 20
    positions: str = "default"  # default | each | all
    seed: int = 0
    batch_size: int | None = None
    copies: int | None = None
    estimator: str = "atp"  # atp | atp_star | ig | graddrop | relp | gim | relp_gim | relp_t4 | all
    ig_steps: int = 8
    fn_subsets: int = 0  # joint patches of random subsets of the unverified, per site (0: off; AtP*'s bound)
    low_memory: bool = False  # attribution's backward block by block (methods/estimators/blockwise.py): less memory, ~+2 forwards
    progress: bool = True
    ablation: str | None = None  # zero | mean | resample: the source instead of the corrupt run (methods/ablation.py)
    # forward-equivalents a direction's verification may spend beyond the top-k and controls: sites in order, one
    # whose every component that can have an effect fits is verified exhaustively, then the others grow past the
    # top-k by adaptive stopping (analysis/ranking.py); 0: the top-k and controls only
    verify_budget: float = 20.0
    # processes the directions run in: 2 runs direction "both"'s second direction in a forked process, each on
    # half the threads (CPU only; screening.processes: 1.06x faster on SmolLM2, 2 cores); None or 1: one
    processes: int | None = None
    # measure the causes of the flagged components (a half patch each, frozen patches of the large errors:
    # analysis/causes.py); False: the flags alone, their causes marked not measured (SmolLM2 IOI: 0.78x the time)
    measure_causes: bool = True

    def __post_init__(self):
        for s in self.sites:
            check_site(s)
        if not self.sites:
            raise ValueError(f"no sites given; choose from {', '.join(SITES)}")
        check_metrics_and_direction(self, discrete=True)
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; known: {', '.join(POSITIONS)}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (all), got {self.top_k}")
        if self.random_k < 0:
            raise ValueError(f"random_k must be >= 0, got {self.random_k}")
        if not self.verify_budget >= 0:
            raise ValueError(f"verify_budget must be >= 0 forward-equivalents (0: verify the top-k only), "
                             f"got {self.verify_budget}")
        if self.estimator != "all":
            check_estimator(self.estimator)
        if self.ablation is not None:
            check_ablation(self.ablation, self.direction, self.estimator)
        if self.processes not in (None, 1, 2):
            raise ValueError(f"processes must be 1 or 2 (the two directions side by side), got {self.processes}")
        if self.processes == 2 and self.direction != "both":
            raise ValueError(f"processes=2 (--processes 2) runs the two directions side by side; it needs "
                             f"direction='both' (--direction both), got {self.direction!r}")
        if self.fn_subsets != 0 and self.fn_subsets < 4:
            raise ValueError(f"fn_subsets must be 0 (off) or >= 4 (subsets to estimate a variance on both sides "
                             f"of each component), got {self.fn_subsets}; 20 or more gives a useful bound")

    @property
    def estimators(self) -> tuple[str, ...]:
        """Estimators to run; the first ranks, flags and fills ``approx``."""
        return tuple(ESTIMATORS) if self.estimator == "all" else (self.estimator,)

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.direction == "both" else (self.direction,)

    def per_position(self, site: str) -> bool:
        """Researchers start per position for the residual-stream sites, at all positions for heads/neurons."""
        return site in RESID_LIKE if self.positions == "default" else self.positions == "each"


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    metric: str = "logit_diff"
    metrics: tuple[str, ...] = METRICS
    direction: str = "both"  # denoise | noise | both
    top_k: int = 50
    random_k: int = 30
    estimator: str = "atp"  # atp (EAP) | ig (EAP-IG) | gim | relp_gim | relp_t4 (EAP under GIM's rules, RelP's; T = 4)
    ig_steps: int = 8
    circuit_points: int = 12  # circuit sizes on the faithfulness curve
    seed: int = 0
    batch_size: int | None = None
    copies: int | None = None
    mib: bool = False  # MIB's scores and faithfulness curve (edge_mib.py), report.json's "mib"; per position too
    ablation: str | None = None  # zero | mean: the senders' source instead of the corrupt run (methods/edges/sources.py)
    positions: str = "all"  # all: whole edges; each: per-position edges sender@p->receiver@p (methods/edges/positions.py)

    def __post_init__(self):
        check_metrics_and_direction(self)
        check_positions(self.positions)
        if self.estimator not in EDGE_ESTIMATORS:
            raise ValueError(f"Unknown edge estimator {self.estimator!r}; known: {', '.join(EDGE_ESTIMATORS)}")
        check_edge_ablation(self.ablation, self.direction, self.estimator)
        if self.top_k < 1 or self.random_k < 0 or self.circuit_points < 2:
            raise ValueError(f"need top_k >= 1, random_k >= 0, circuit_points >= 2; got {self.top_k}, "
                             f"{self.random_k}, {self.circuit_points}")

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.direction == "both" else (self.direction,)


@dataclass(frozen=True, kw_only=True)
class PromptOptions:
    """How a run's prompts are chosen and encoded (prompts.prepare_pairs) and which corrupt run they get
    (prompts.corrupted): the same for the screen, the edge screen and the windows. ``corruption``: one or
    more of str | abc | noise (several: one screen each, compared; the edge screen takes str alone);
    ``noise_std``: the noise corruption's std, in units of the embeddings' std; ``prepend_bos``: auto | yes |
    no | a token; ``template``: a built-in task's template index or a task file's label; ``keep_correct``: keep
    only the pairs the model solves. The draw's seed and the batch size are the screen config's (``seed``
    also draws the controls; both are in the manifest's options), not here."""

    n_prompts: int = 16
    corruption: tuple[str, ...] = ("str",)
    noise_std: float = 3.0
    prepend_bos: str = "auto"
    template: int | str | None = None
    keep_correct: bool = False

    def __post_init__(self):
        if isinstance(self.n_prompts, bool) or not isinstance(self.n_prompts, int) or self.n_prompts < 1:
            raise ValueError(f"n_prompts must be an integer >= 1, got {self.n_prompts!r}")
        if not isinstance(self.corruption, tuple) or not self.corruption:
            raise ValueError(f"corruption takes a non-empty tuple of names, e.g. ('str',) or ('str', 'noise'), "
                             f"got {self.corruption!r}")
        for name in self.corruption:
            check_corruption(name)
        if len(set(self.corruption)) < len(self.corruption):
            raise ValueError(f"corruption {self.corruption!r} names one twice; give each once")
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0 (units of the embeddings' std; 3.0 is causal tracing's), "
                             f"got {self.noise_std!r}")
        check_bos_mode(self.prepend_bos)
        if isinstance(self.template, int) and self.template < 0:
            raise ValueError(f"template must be a template index >= 0 or a task file's label, got {self.template}")


def prompt_options(prompts: PromptOptions | None, keywords: dict, caller: str) -> PromptOptions:
    """``prompts``, or one built from PromptOptions' field names passed as keywords (run_screen's keywords
    before the options had a type; ``corruption`` may be a comma-separated string "str,noise"); both at once
    is refused, as is a keyword PromptOptions lacks (``caller``: the function, for the message)."""
    unknown = sorted(set(keywords) - set(PromptOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; its prompt keywords "
                        f"are PromptOptions' fields: {', '.join(PromptOptions.__dataclass_fields__)}")
    if prompts is not None and keywords:
        raise TypeError(f"{caller}() takes prompts=PromptOptions(...) or the keywords {', '.join(keywords)}, not "
                        "both; put them into the PromptOptions")
    if prompts is not None:
        return prompts
    corruption = keywords.get("corruption", ("str",))
    if isinstance(corruption, str):  # "str,noise", spaces allowed
        corruption = tuple(dict.fromkeys(c.strip() for c in corruption.split(",") if c.strip())) or (corruption,)
    return PromptOptions(**{**keywords, "corruption": tuple(corruption)})
