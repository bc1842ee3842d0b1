"""What every merge method gets (a pool, a validation judge, the ranking, the components
and a search) and returns: ``METHODS[name](ctx, **options) -> MethodResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..components import Components
from ..mixing import StateDict
from ..inputs.pool import IngredientPool
from ..search import Search


class ValidationJudge:
    """Validation accuracy of a state dict: the only signal any method may select on."""

    def __init__(self, accuracy: Callable[[StateDict], float]):
        self._accuracy = accuracy
        self.evaluations = 0

    def __call__(self, state_dict: StateDict) -> float:
        self.evaluations += 1
        return self._accuracy(state_dict)


@dataclass
class SoupContext:
    pool: IngredientPool
    judge: ValidationJudge
    ranking: list[tuple[str, float]]  # (ingredient, val accuracy), best first
    components: Components | None = None  # the weights' partition, for per-component mixing
    search: Search | None = None          # evaluates and optimises mixing points

    @classmethod
    def rank(cls, pool: IngredientPool, judge: ValidationJudge, **rest) -> "SoupContext":
        scores = [(name, judge(pool.load(name))) for name in pool.names]
        # Stable sort: ties keep pool order, so the ranking is deterministic.
        return cls(pool, judge, sorted(scores, key=lambda s: -s[1]), **rest)


@dataclass
class MethodResult:
    state_dict: StateDict
    ingredients: list[str]
    evaluations: int  # validation evaluations the method spent beyond the ranking
    ranked: bool = True  # used the shared ranking (its cost is charged to the method)
    details: object | None = None  # a method's own typed record (a dataclass), if any

    def details_dict(self) -> dict:
        return asdict(self.details) if self.details is not None else {}


Method = Callable[..., MethodResult]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return wrap
