"""The tuner's search space, defined once as data.

``PARAMETERS`` lists every tunable field of a Plan with its description and a function that
returns the valid choices for a layer, given the values already chosen for the parameters it
depends on. From that one table the tuner derives the help text, the validation of fixed
values, the enumeration of every valid configuration (the exhaustive grid) and a prefix tree
that the Optuna sampler walks. A trial therefore only ever proposes a valid configuration.
"""

import dataclasses
from typing import Callable, NamedTuple

from .. import _lib
from ..plan import Plan, desc_struct

# Directions a search runs on, and the library ops each one calls.
SEARCH_DIRECTIONS = ("forward", "backward_data", "backward_weight")
DIRECTION_OPS = {
    "forward": ("forward",),
    "backward_data": ("backward_data",),
    "backward_weight": ("backward_weight",),
    "backward": ("backward_data", "backward_weight"),
}

# Tile fields each algorithm reads per op; a tile the kernel ignores would only waste trials.
# Limitation: this table mirrors the kernels of this build (cpp/src/conv/conv2d_fast.*:
# pcm_choose_tile reads block_k and block_w, the channel loops block_c, pcm_choose_dot
# block_k). The table has no dtype, so float32 searches spend some trials on the block_w of
# the gemm weight gradient, which only its float64 pixel GEMM reads.
# A kernel that starts reading another tile needs its entry here before the tuner
# searches that tile.
TILES_READ = {
    ("direct", "forward"): ("block_k", "block_c", "block_w"),
    ("gemm", "forward"): ("block_k", "block_c", "block_w"),
    ("gemm", "backward_data"): ("block_k", "block_c", "block_w"),
    ("gemm", "backward_weight"): ("block_k", "block_c", "block_w"),
}
TILE_CHOICES = (0, 4, 8, 16, 32, 64)
# The reference algorithm is a scalar test path, never the fastest; the tuner leaves it out.
SEARCH_ALGORITHMS = tuple(a for a in _lib.ALGORITHMS if a != "reference")
# Winograd rounds each output with its whole input tile (several times the error of direct
# summation) and turns infinite or near-overflow inputs into NaN, so a profile would change
# results behind the caller's back. It is searched only on request (--allow-winograd) or when
# pinned with --fix algorithm=winograd.
OPT_IN_ALGORITHMS = ("winograd",)


@dataclasses.dataclass(frozen=True)
class Context:
    """Layer, direction and machine facts that the valid choices depend on.

    ``collective`` is True when trials run one call over the whole communicator (strategies
    and active ranks are searched) and False when every rank runs its own local call.
    """

    geo: object
    direction: str
    comm_size: int = 1
    ranks_per_node: int = 1
    cores: int = 1
    collective: bool = False
    fixed: tuple = ()  # ((name, value), ...) from --fix
    allow_winograd: bool = False


class Parameter(NamedTuple):
    """One searched field: its name, description, dependencies and choices function."""

    name: str
    description: str
    depends_on: tuple
    choices: Callable
    kind: type = int


def _ladder(limit):
    """Return 1, 2, 4, ... below ``limit``, then ``limit`` itself."""
    values, value = [], 1
    while value < limit:
        values.append(value)
        value *= 2
    values.append(limit)
    return tuple(values)


def _active_ranks(ctx, values):
    return _ladder(ctx.comm_size) if ctx.collective else (1,)


def _grids(ctx, ranks):
    # A grid with one row or one column is the batch or channels strategy under another name.
    return tuple(
        f"{b}x{ranks // b}" for b in range(2, ranks // 2 + 1)
        if ranks % b == 0 and b <= ctx.geo.n and ranks // b <= ctx.geo.k
    )


def _strategy(ctx, values):
    ranks = values["active_ranks"]
    if not ctx.collective:
        return ("local",)
    if ranks == 1:
        return ("batch",)  # one active rank computes everything, whatever the split
    # A split dimension smaller than the active ranks leaves a rank idle, which a smaller
    # active_ranks value covers already.
    sizes = {"batch": ctx.geo.n, "channels": ctx.geo.k, "rows": ctx.geo.out_h}
    found = tuple(name for name, size in sizes.items() if size >= ranks)
    return found + (("hybrid",) if _grids(ctx, ranks) else ())


def _grid(ctx, values):
    if values["strategy"] != "hybrid":
        return ("0x0",)
    return _grids(ctx, values["active_ranks"])


def _threads(ctx, values):
    ranks_here = min(values["active_ranks"], ctx.ranks_per_node) if ctx.collective else ctx.ranks_per_node
    return _ladder(max(1, ctx.cores // max(1, ranks_here)))


def _algorithm(ctx, values):
    desc = desc_struct(ctx.geo)
    requested = {"winograd"} if ctx.allow_winograd else set()
    requested.update(v for k, v in ctx.fixed if k == "algorithm")
    return tuple(
        name for name in SEARCH_ALGORITHMS
        if (name not in OPT_IN_ALGORITHMS or name in requested)
        and all(_lib.algorithm_supported(name, op, desc) for op in DIRECTION_OPS[ctx.direction])
    )


def _tile(name, limit_of):
    def choices(ctx, values):
        read = set()
        for op in DIRECTION_OPS[ctx.direction]:
            read.update(TILES_READ.get((values["algorithm"], op), ()))
        if name not in read:
            return (0,)
        return tuple(v for v in TILE_CHOICES if v <= limit_of(ctx.geo))
    return choices


PARAMETERS = (
    Parameter("active_ranks", "ranks that compute (1 up to the communicator size); the others "
              "only join the collectives", (), _active_ranks),
    Parameter("strategy", "how the active ranks split the work: batch, channels (output "
              "channels), rows (output rows with halos), hybrid (batch x channels grid); "
              "local without a communicator", ("active_ranks",), _strategy, str),
    Parameter("grid", "hybrid process grid as BATCHxCHANNELS ranks; 0x0 for other strategies",
              ("active_ranks", "strategy"), _grid, str),
    Parameter("threads", "OpenMP threads per rank; active ranks on a node x threads <= cores",
              ("active_ranks",), _threads),
    Parameter("algorithm", "kernel algorithm, among those the library supports for the layer "
              "and direction (auto: the library's heuristic)", (), _algorithm, str),
    Parameter("block_k", "output channels per tile (0: the kernel chooses); at most the output "
              "channels per group", ("algorithm",), _tile("block_k", lambda g: g.k // g.groups)),
    Parameter("block_c", "input channels per tile (0: the kernel chooses); at most the input "
              "channels per group", ("algorithm",), _tile("block_c", lambda g: g.c // g.groups)),
    Parameter("block_w", "output columns per tile (0: the kernel chooses); at most the output "
              "width", ("algorithm",), _tile("block_w", lambda g: g.out_w)),
)
NAMES = tuple(p.name for p in PARAMETERS)
_BY_NAME = {p.name: p for p in PARAMETERS}


def describe():
    """Return the parameter table as help text, one parameter per line."""
    width = max(map(len, NAMES))
    return "\n".join(f"  {p.name:<{width}}  {p.description}" for p in PARAMETERS)


def parse_fixed(items):
    """Parse ``NAME=VALUE`` texts into a ``((name, value), ...)`` tuple.

    Raises
    ------
    ValueError
        For text without ``=``, an unknown name (listing the known ones) or a value of the
        wrong kind.
    """
    fixed = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"fixed parameter must look like NAME=VALUE; got {item!r}")
        if name not in _BY_NAME:
            raise ValueError(
                f"unknown search parameter {name!r}; known parameters are {', '.join(NAMES)}"
            )
        kind = _BY_NAME[name].kind
        try:
            fixed[name] = kind(text.strip())
        except ValueError:
            raise ValueError(f"search parameter {name} must be an integer; got {text!r}") from None
    return tuple(fixed.items())


def check_config(config):
    """Raise ValueError unless ``config`` names exactly the parameters of the space."""
    unknown = set(config) - set(NAMES)
    if unknown:
        raise ValueError(
            f"unknown search parameters {sorted(unknown)}; known parameters are {', '.join(NAMES)}"
        )
    missing = [name for name in NAMES if name not in config]
    if missing:
        raise ValueError(f"configuration lacks search parameters {missing}")


def enumerate_configs(ctx):
    """Return every valid configuration (a list of dicts, in a fixed order)."""
    fixed = dict(ctx.fixed)
    configs = []

    def walk(index, values):
        if index == len(PARAMETERS):
            configs.append(dict(values))
            return
        param = PARAMETERS[index]
        for value in param.choices(ctx, values):
            if param.name in fixed and value != fixed[param.name]:
                continue
            values[param.name] = value
            walk(index + 1, values)
            del values[param.name]

    walk(0, {})
    return configs


def to_plan(config, source="user"):
    """Return the Plan of a configuration."""
    check_config(config)
    batch, channels = (int(v) for v in config["grid"].split("x"))
    return Plan(strategy=config["strategy"], active_ranks=config["active_ranks"],
                threads=config["threads"], algorithm=config["algorithm"],
                block_k=config["block_k"], block_c=config["block_c"], block_w=config["block_w"],
                grid=(batch, channels), source=source)


def from_plan(plan):
    """Return the configuration of a Plan (the inverse of ``to_plan``)."""
    return {"active_ranks": plan.active_ranks, "strategy": plan.strategy,
            "grid": f"{plan.grid[0]}x{plan.grid[1]}", "threads": plan.threads,
            "algorithm": plan.algorithm, "block_k": plan.block_k, "block_c": plan.block_c,
            "block_w": plan.block_w}


def config_key(config):
    """Return a hashable identity of a configuration."""
    return tuple(config[name] for name in NAMES)


def label(plan):
    """Return a short human-readable description of a Plan."""
    if plan.strategy == "local":
        head = "local"
    elif plan.active_ranks == 1:
        head = "1 rank"
    elif plan.strategy == "hybrid":
        head = f"hybrid x{plan.active_ranks} ({plan.grid[0]}x{plan.grid[1]})"
    else:
        head = f"{plan.strategy} x{plan.active_ranks}"
    threads = f"{plan.threads}t" if plan.threads else "default threads"
    tiles = "/".join(f"{name[-1]}{getattr(plan, name)}" for name in ("block_k", "block_c", "block_w")
                     if getattr(plan, name))
    return " ".join(part for part in (head, threads, plan.algorithm, tiles) if part)


class Space:
    """The valid configurations of one layer and direction, as a prefix tree for sampling.

    At each level only values with at least one valid completion are offered, so sampling
    never produces an invalid configuration. The Optuna name of a parameter is its plain name
    when every branch offers the same choices, else the name followed by the choices (Optuna
    requires one distribution per name within a study).
    """

    def __init__(self, ctx, configs=None):
        self.ctx = ctx
        if configs is None:
            self.configs = enumerate_configs(ctx)
        else:
            # An explicit list (replayed measurements in tests) is taken as the whole space.
            for config in configs:
                check_config(config)
            self.configs = [dict(c) for c in configs]
        if not self.configs:
            raise ValueError(
                f"no valid configuration for the {ctx.direction} direction with the fixed "
                f"values {dict(ctx.fixed)}"
            )
        self._tree = {}
        for config in self.configs:
            node = self._tree
            for name in NAMES:
                node = node.setdefault(config[name], {})
        choice_sets = {name: set() for name in NAMES}
        self._collect(self._tree, 0, choice_sets)
        self._qualified = {name: len(sets) > 1 for name, sets in choice_sets.items()}

    def _collect(self, node, depth, choice_sets):
        if depth == len(NAMES):
            return
        choice_sets[NAMES[depth]].add(tuple(node))
        for child in node.values():
            self._collect(child, depth + 1, choice_sets)

    def __len__(self):
        return len(self.configs)

    def optuna_name(self, name, choices):
        """Return the Optuna parameter name for ``name`` offered with ``choices``."""
        if not self._qualified[name]:
            return name
        return f"{name}[{','.join(map(str, choices))}]"

    def sample(self, trial):
        """Return a configuration chosen through ``trial.suggest_categorical``."""
        node, config = self._tree, {}
        for name in NAMES:
            choices = tuple(node)
            if len(choices) == 1:
                value = choices[0]
            else:
                value = trial.suggest_categorical(self.optuna_name(name, choices), choices)
            config[name] = value
            node = node[value]
        return config

    def project(self, config):
        """Return the Optuna parameters of the valid configuration nearest to ``config``.

        A value outside the offered choices becomes the largest smaller number (else the
        smallest) or, for text, the first choice. Returns ``(params, projected_config)``.
        """
        node, params, projected = self._tree, {}, {}
        for name in NAMES:
            choices = tuple(node)
            value = config.get(name)
            if value not in choices:
                numbers = [c for c in choices if isinstance(c, int) and isinstance(value, int)]
                below = [c for c in numbers if c <= value]
                if below:
                    value = max(below)
                elif numbers:
                    value = min(numbers)
                else:
                    value = choices[0]
            if len(choices) > 1:
                params[self.optuna_name(name, choices)] = value
            projected[name] = value
            node = node[value]
        return params, projected
