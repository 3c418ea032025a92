"""Closed-vocabulary referring expressions for SynRef.

An expression is first built as a structured :class:`Expression`, rendered to text with
:func:`render`, and then checked by :func:`resolve`, which *parses the text back* with a
small hand-written grammar and evaluates it against the scene.

Semantics (all on the per-object ``synref`` metadata: ``center`` [x, y] and ``box``
[x0, y0, x1, y1], the extent of the unoccluded shape):

* ``beyond(a, b, side)``: ``a`` lies clearly further toward ``side`` than ``b``:
  left ``a.cx < b.x0``, right ``a.cx > b.x1``, top ``a.cy < b.y0``, bottom ``a.cy > b.y1``.
* Location ``(side, k)`` over the candidates ``C`` (the objects matching the noun phrase):
  object ``a`` has rank ``k`` from ``side`` when every other candidate is comparable with it
  (one of the two lies beyond the other) and exactly ``k - 1`` candidates lie beyond ``a``.
  "left X" is rank 1 from the left; "top left X" is rank 1 from the top and from the left;
  "second X from the left" is rank 2. The rank is unique by construction.
* Relations against a landmark noun phrase that must match exactly one object ``l``
  (``between`` needs exactly two): "left of" ``beyond(a, l, left)``, "right of", "above"
  (``beyond(a, l, top)``), "below"; "closest to": the candidate whose centre is nearest to
  ``l``'s centre, kept only if its distance is below ``CLOSEST_RATIO`` times the runner-up's;
  "between the two Ls": ``a``'s centre projects onto the segment joining the two centres at
  a parameter in [0.15, 0.85] and lies within 0.3 segment lengths of it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import numpy as np

SHAPES_ROUND: tuple[str, ...] = ("circle", "oval", "ring", "heart", "crescent")
SHAPES_ANGULAR: tuple[str, ...] = ("square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross")
SHAPES: tuple[str, ...] = SHAPES_ROUND + SHAPES_ANGULAR
FAMILIES: dict[str, tuple[str, ...]] = {"round": SHAPES_ROUND, "angular": SHAPES_ANGULAR}
FAMILY_OF: dict[str, str] = {s: fam for fam, shapes in FAMILIES.items() for s in shapes}
PLURAL: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES: tuple[str, ...] = ("small", "medium", "large")
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
ATTRIBUTES: tuple[str, ...] = ("size", "pattern", "color")  # rendering order before the noun

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "size": {"small": ("small", "little"), "medium": ("medium",), "large": ("large", "big")},
    "pattern": {"solid": ("solid", "plain"), "striped": ("striped", "stripy"), "dotted": ("dotted", "spotted")},
    "color": {c: (c,) for c in COLORS},
}
WORD_TO_ATTRIBUTE: dict[str, tuple[str, str]] = {
    word: (attr, value) for attr, table in SYNONYMS.items() for value, words in table.items() for word in words
}
SINGULAR_NOUN: dict[str, str] = {s: s for s in SHAPES}
PLURAL_NOUN: dict[str, str] = {p: s for s, p in PLURAL.items()}

SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
VERTICAL_WORDS: dict[str, str] = {"top": "top", "upper": "top", "topmost": "top",
                                  "bottom": "bottom", "lower": "bottom", "bottommost": "bottom"}
HORIZONTAL_WORDS: dict[str, str] = {"left": "left", "leftmost": "left", "right": "right", "rightmost": "right"}
SIDE_PREFIX: dict[str, tuple[str, ...]] = {
    side: tuple(w for w, s in {**VERTICAL_WORDS, **HORIZONTAL_WORDS}.items() if s == side) for side in SIDES
}
CORNER_PREFIX: dict[str, tuple[str, ...]] = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
SIDE_SUFFIX: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
}
ORDINALS: dict[int, str] = {2: "second", 3: "third"}
ORDINAL_RANK: dict[str, int] = {w: k for k, w in ORDINALS.items()}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below", "closest", "between")
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
    "closest": ("closest to", "nearest to"),
    "between": ("between",),
}
REL_SIDE: dict[str, str] = {"left": "left", "right": "right", "above": "top", "below": "bottom"}
LINKERS: tuple[str, ...] = ("that is", "which is")
CLOSEST_RATIO = 0.75


@dataclass(frozen=True)
class NounPhrase:
    """A shape noun with optional attribute modifiers; ``None`` means "not mentioned"."""

    shape: str
    size: str | None = None
    pattern: str | None = None
    color: str | None = None


@dataclass(frozen=True)
class Expression:
    """A structured referring expression.

    ``location`` is a tuple of ``(side, rank)`` pairs (vertical side first for corners);
    ``relation``/``landmark`` name a relation to another noun phrase (plural for ``between``).
    """

    target: NounPhrase
    location: tuple[tuple[str, int], ...] = ()
    relation: str | None = None
    landmark: NounPhrase | None = None

    @property
    def kind(self) -> str:
        """The expression type: ``"relation"``, ``"location"`` or ``"attribute"``."""
        if self.relation:
            return "relation"
        return "location" if self.location else "attribute"


_PHRASE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(NounPhrase))


@dataclass(frozen=True)
class SceneObject:
    """The geometry and attributes the resolver needs of one object."""

    shape: str
    size: str
    pattern: str
    color: str
    cx: float
    cy: float
    x0: float
    y0: float
    x1: float
    y1: float


def scene_objects(objects: Sequence[dict[str, Any]]) -> list[SceneObject]:
    """Convert annotation dicts (with a ``synref`` key) or bare ``synref`` dicts to :class:`SceneObject`."""
    out = []
    for obj in objects:
        meta = obj.get("synref", obj)
        (cx, cy), (x0, y0, x1, y1) = meta["center"], meta["box"]
        out.append(SceneObject(meta["shape"], meta["size"], meta["pattern"], meta["color"],
                               float(cx), float(cy), float(x0), float(y0), float(x1), float(y1)))
    return out


# --------------------------------------------------------------------------- evaluation


MatchCache = dict[NounPhrase, list[int]]


def matches(phrase: NounPhrase, objs: Sequence[SceneObject], cache: MatchCache | None = None) -> list[int]:
    """Indices of the objects that have every attribute the noun phrase mentions (memoised in ``cache``)."""
    if cache is not None:
        if phrase not in cache:
            cache[phrase] = matches(phrase, objs)
        return cache[phrase]
    wanted = [(k, getattr(phrase, k)) for k in _PHRASE_FIELDS if getattr(phrase, k) is not None]
    return [i for i, o in enumerate(objs) if all(getattr(o, k) == v for k, v in wanted)]


def beyond(a: SceneObject, b: SceneObject, side: str) -> bool:
    """Whether ``a``'s centre lies past ``b``'s (unoccluded) box edge toward ``side``."""
    if side == "left":
        return a.cx < b.x0
    if side == "right":
        return a.cx > b.x1
    if side == "top":
        return a.cy < b.y0
    if side == "bottom":
        return a.cy > b.y1
    raise ValueError(f"unknown side {side!r}")


def side_rank(i: int, group: Sequence[int], objs: Sequence[SceneObject], side: str) -> int | None:
    """Rank (1-based) of object ``i`` from ``side`` within ``group``, or ``None`` if not clear-cut."""
    before = after = 0
    for j in group:
        if j == i:
            continue
        if beyond(objs[j], objs[i], side):
            before += 1
        elif beyond(objs[i], objs[j], side):
            after += 1
        else:
            return None
    return before + 1


def _closest(candidates: list[int], anchor: SceneObject, objs: Sequence[SceneObject]) -> list[int]:
    dists = sorted((math.hypot(objs[i].cx - anchor.cx, objs[i].cy - anchor.cy), i) for i in candidates)
    if len(dists) == 1 or (dists and dists[0][0] < CLOSEST_RATIO * dists[1][0]):
        return [dists[0][1]]
    return []


def _between(a: SceneObject, p: SceneObject, q: SceneObject) -> bool:
    dx, dy = q.cx - p.cx, q.cy - p.cy
    length2 = dx * dx + dy * dy
    if length2 == 0:
        return False
    t = ((a.cx - p.cx) * dx + (a.cy - p.cy) * dy) / length2
    perp = abs((a.cx - p.cx) * dy - (a.cy - p.cy) * dx) / math.sqrt(length2)
    return 0.15 <= t <= 0.85 and perp <= 0.3 * math.sqrt(length2)


def evaluate(expr: Expression, objs: Sequence[SceneObject], cache: MatchCache | None = None) -> list[int]:
    """Indices of the objects the structured expression refers to (sorted)."""
    cands = matches(expr.target, objs, cache)
    if expr.location:
        return [i for i in cands if all(side_rank(i, cands, objs, s) == k for s, k in expr.location)]
    if not expr.relation:
        return cands
    assert expr.landmark is not None
    land = matches(expr.landmark, objs, cache)
    cands = [i for i in cands if i not in land]
    if expr.relation == "between":
        if len(land) != 2:
            return []
        p, q = objs[land[0]], objs[land[1]]
        return [i for i in cands if _between(objs[i], p, q)]
    if len(land) != 1:
        return []
    anchor = objs[land[0]]
    if expr.relation == "closest":
        return sorted(_closest(cands, anchor, objs)) if cands else []
    side = REL_SIDE[expr.relation]
    return [i for i in cands if beyond(objs[i], anchor, side)]


# --------------------------------------------------------------------------- rendering


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def render_phrase(phrase: NounPhrase, rng: np.random.Generator, plural: bool = False) -> str:
    """Render a noun phrase without article, e.g. ``"big striped red star"``."""
    words = [_pick(rng, SYNONYMS[a][getattr(phrase, a)]) for a in ATTRIBUTES if getattr(phrase, a) is not None]
    words.append(PLURAL[phrase.shape] if plural else phrase.shape)
    return " ".join(words)


def _render_location(expr: Expression, np_text: str, rng: np.random.Generator) -> str:
    loc = expr.location
    if len(loc) == 2:  # corner: vertical side first
        (v, _), (h, _) = loc
        if rng.random() < 0.7:
            return f"{_pick(rng, CORNER_PREFIX[v])} {h} {np_text}"
        return f"{np_text} in the {v} {h} corner"
    (side, rank), = loc
    if rank > 1:
        return f"{ORDINALS[rank]} {np_text} from the {side}"
    if rng.random() < 0.6:
        return f"{_pick(rng, SIDE_PREFIX[side])} {np_text}"
    return f"{np_text} {SIDE_SUFFIX[side]}"


def render(expr: Expression, rng: np.random.Generator, article_prob: float = 0.3) -> str:
    """Render a structured expression to a lower-case sentence with randomly chosen synonyms."""
    text = render_phrase(expr.target, rng)
    if expr.location:
        text = _render_location(expr, text, rng)
    elif expr.relation:
        assert expr.landmark is not None
        if rng.random() < 0.5:
            text += " " + _pick(rng, LINKERS)
        text += " " + _pick(rng, REL_PHRASES[expr.relation])
        if expr.relation == "between":
            text += " the two " + render_phrase(expr.landmark, rng, plural=True)
        else:
            text += " the " + render_phrase(expr.landmark, rng)
    if rng.random() < article_prob:
        text = "the " + text
    return text


# --------------------------------------------------------------------------- parsing


class _Cursor:
    """A token cursor with small matching helpers."""

    def __init__(self, text: str) -> None:
        self.toks = text.lower().split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, phrase: str) -> bool:
        """Consume ``phrase`` (one or more words) if it comes next."""
        words = phrase.split()
        if self.toks[self.pos:self.pos + len(words)] == words:
            self.pos += len(words)
            return True
        return False

    def done(self) -> bool:
        return self.pos == len(self.toks)


def _parse_phrase(cur: _Cursor, plural: bool = False) -> NounPhrase | None:
    """Parse ``modifier* noun``; each attribute may be mentioned at most once."""
    attrs: dict[str, str] = {}
    nouns = PLURAL_NOUN if plural else SINGULAR_NOUN
    while (word := cur.peek()) is not None:
        cur.pos += 1
        if word in nouns:
            return NounPhrase(shape=nouns[word], **attrs)
        if word not in WORD_TO_ATTRIBUTE:
            return None
        attr, value = WORD_TO_ATTRIBUTE[word]
        if attr in attrs:
            return None
        attrs[attr] = value
    return None


def _parse_relation(cur: _Cursor, target: NounPhrase) -> Expression | None:
    for linker in LINKERS:
        if cur.take(linker):
            break
    for rel in RELATIONS:
        if any(cur.take(p) for p in REL_PHRASES[rel]):
            if rel == "between":
                if not cur.take("the two"):
                    return None
                landmark = _parse_phrase(cur, plural=True)
            else:
                cur.take("the")
                landmark = _parse_phrase(cur)
            if landmark is None:
                return None
            return Expression(target, relation=rel, landmark=landmark)
    return None


def _parse_suffix(cur: _Cursor, target: NounPhrase) -> Expression | None:
    for side, phrase in SIDE_SUFFIX.items():
        if cur.take(phrase):
            return Expression(target, location=((side, 1),))
    for v, h in itertools.product(("top", "bottom"), ("left", "right")):
        if cur.take(f"in the {v} {h} corner"):
            return Expression(target, location=((v, 1), (h, 1)))
    return _parse_relation(cur, target)


def parse(text: str) -> Expression | None:
    """Parse a sentence of the SynRef grammar into an :class:`Expression` (``None`` if ungrammatical)."""
    cur = _Cursor(text)
    cur.take("the")
    word = cur.peek()
    if word in ORDINAL_RANK:  # "second star from the top"
        cur.pos += 1
        target = _parse_phrase(cur)
        if target is None or not cur.take("from the") or cur.peek() not in SIDES:
            return None
        side = cur.peek()
        cur.pos += 1
        expr = Expression(target, location=((side, ORDINAL_RANK[word]),))
    else:
        sides = []
        if cur.peek() in VERTICAL_WORDS:
            sides.append(VERTICAL_WORDS[cur.toks[cur.pos]])
            cur.pos += 1
        if cur.peek() in HORIZONTAL_WORDS:
            sides.append(HORIZONTAL_WORDS[cur.toks[cur.pos]])
            cur.pos += 1
        target = _parse_phrase(cur)
        if target is None:
            return None
        if sides:
            expr = Expression(target, location=tuple((s, 1) for s in sides))
        elif cur.done():
            expr = Expression(target)
        else:
            parsed = _parse_suffix(cur, target)
            if parsed is None:
                return None
            expr = parsed
    return expr if cur.done() else None


def resolve_objects(expression: str, objs: Sequence[SceneObject]) -> list[int]:
    """:func:`resolve` on already converted :class:`SceneObject` s."""
    expr = parse(expression)
    return [] if expr is None else evaluate(expr, objs)


def resolve(expression: str, objects: list[dict]) -> list[int]:
    """Parse ``expression`` and return the indices of the matching objects.

    ``objects`` are the image's annotations as written to ``instances.json`` (each with a
    ``synref`` key) or the bare ``synref`` dicts. An ungrammatical sentence matches nothing.
    """
    return resolve_objects(expression, scene_objects(objects))


def vocabulary() -> list[str]:
    """Every word the generator can emit, sorted."""
    words: set[str] = {"the", "two", "from", "in", "corner"}
    words.update(WORD_TO_ATTRIBUTE, SINGULAR_NOUN, PLURAL_NOUN, VERTICAL_WORDS, HORIZONTAL_WORDS, ORDINAL_RANK)
    for phrase in itertools.chain(SIDE_SUFFIX.values(), LINKERS, *REL_PHRASES.values()):
        words.update(phrase.split())
    return sorted(words)


# --------------------------------------------------------------------------- candidates


def _subsets(obj: SceneObject, attrs: Sequence[str] = ATTRIBUTES, max_size: int = 3) -> Iterator[NounPhrase]:
    """Noun phrases naming ``obj``'s shape plus each subset (up to ``max_size``) of ``attrs``."""
    for n in range(min(max_size, len(attrs)) + 1):
        for combo in itertools.combinations(attrs, n):
            yield NounPhrase(obj.shape, **{a: getattr(obj, a) for a in combo})


def _n_attrs(phrase: NounPhrase) -> int:
    return sum(getattr(phrase, a) is not None for a in ATTRIBUTES)


def attribute_expressions(target: int, objs: Sequence[SceneObject], extra: int = 1,
                          cache: MatchCache | None = None) -> list[Expression]:
    """Unique attribute-only expressions with at most ``extra`` more modifiers than the shortest one."""
    valid = [Expression(p) for p in _subsets(objs[target]) if matches(p, objs, cache) == [target]]
    if not valid:
        return []
    shortest = min(_n_attrs(e.target) for e in valid)
    return [e for e in valid if _n_attrs(e.target) <= shortest + extra]


def location_expressions(target: int, objs: Sequence[SceneObject],
                         cache: MatchCache | None = None) -> list[Expression]:
    """Unique absolute-location expressions whose noun phrase (at most one modifier) matches 2+ objects."""
    out = []
    for phrase in _subsets(objs[target], max_size=1):
        group = matches(phrase, objs, cache)
        if len(group) < 2:
            continue
        ranks = {s: side_rank(target, group, objs, s) for s in SIDES}
        for side, rank in ranks.items():
            if rank == 1 or (rank is not None and rank in ORDINALS and len(group) > rank):
                out.append(Expression(phrase, location=((side, rank),)))
        for v, h in itertools.product(("top", "bottom"), ("left", "right")):
            if ranks[v] == 1 and ranks[h] == 1:
                out.append(Expression(phrase, location=((v, 1), (h, 1))))
    return [e for e in out if evaluate(e, objs, cache) == [target]]


def _landmark_phrases(target: int, objs: Sequence[SceneObject],
                      cache: MatchCache | None = None) -> list[tuple[str, NounPhrase]]:
    """(relation kind, landmark) pairs: shortest unique phrases of each other object, and pair phrases."""
    out: list[tuple[str, NounPhrase]] = []
    for j, obj in enumerate(objs):
        if j == target:
            continue
        unique = [p for p in _subsets(obj) if matches(p, objs, cache) == [j]]
        if unique:
            shortest = min(_n_attrs(p) for p in unique)
            out.extend(("single", p) for p in unique if _n_attrs(p) <= shortest + 1)
    for j, k in itertools.combinations(range(len(objs)), 2):
        a, b = objs[j], objs[k]
        if target in (j, k) or a.shape != b.shape:
            continue
        shared = [attr for attr in ATTRIBUTES if getattr(a, attr) == getattr(b, attr)]
        out.extend(("pair", p) for p in _subsets(a, shared) if matches(p, objs, cache) == [j, k])
    return out


def relation_expressions(target: int, objs: Sequence[SceneObject], rng: np.random.Generator,
                         limit: int = 8, cache: MatchCache | None = None) -> list[Expression]:
    """Up to ``limit`` unique relational expressions, drawn lazily in random order."""
    cache = {} if cache is None else cache
    pairs = [(landmark, rel) for kind, landmark in _landmark_phrases(target, objs, cache)
             for rel in (("between",) if kind == "pair" else ("left", "right", "above", "below", "closest"))]
    phrases = list(_subsets(objs[target]))
    out = []
    for idx in rng.permutation(len(pairs) * len(phrases)):
        (landmark, rel), phrase = pairs[idx // len(phrases)], phrases[idx % len(phrases)]
        expr = Expression(phrase, relation=rel, landmark=landmark)
        if evaluate(expr, objs, cache) == [target]:
            out.append(expr)
            if len(out) >= limit:
                break
    return out
