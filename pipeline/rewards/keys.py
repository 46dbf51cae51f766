"""COPO answer classes: per-prompt equivalence class ids from the responses' answer keys."""

from __future__ import annotations

from typing import Sequence


def class_ids(keys: Sequence[str | None], merges: Sequence[tuple[int, int]] = ()) -> list[int]:
    """One group's answer keys, optional extra equalities -> class id per response.

    Equal keys share a class; `merges` are pairs of response indices also known to be equal
    (e.g. judged by math-verify), joined transitively. Ids are 0, 1, ... in order of first
    appearance. A response without an answer (key None) is a class of its own: having no
    answer is no evidence of agreement, so it must raise the group's consistency entropy
    rather than lower it.
    """
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first_with_key: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key in first_with_key:
            union(first_with_key[key], i)
        else:
            first_with_key[key] = i
    for i, j in merges:
        if keys[i] is None or keys[j] is None:
            raise ValueError(f"cannot merge response {i} or {j}: it has no answer key")
        union(i, j)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(keys))]


def distinct_pairs(keys: Sequence[str | None]) -> list[tuple[int, int]]:
    """One group's answer keys -> pairs (i, j) of first occurrences of two different keys.

    These are the only comparisons an equivalence check needs: responses with equal keys are
    already in one class.
    """
    firsts: list[int] = []
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key is not None and key not in seen:
            seen.add(key)
            firsts.append(i)
    return [(a, b) for n, a in enumerate(firsts) for b in firsts[n + 1 :]]
