"""Pareto frontiers of (GFLOPs, mIoU) points and matched-cost comparisons of stop-rule families."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ['frontier', 'interpolate_miou', 'interpolate_gflops', 'matched_cost']


def frontier(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the Pareto frontier of (GFLOPs, mIoU) points (no other point is as cheap and better), by GFLOPs."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    out, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            out.append(i)
            best = points[i][1]
    return out


def interpolate_miou(front: Sequence[Tuple[float, float]], gflops: float) -> Tuple[Optional[float], str]:
    """mIoU on a frontier (sorted by GFLOPs, mIoU increasing) at ``gflops``, linear between points.

    Returns:
        tuple: ``(value, '')``, or ``(None, 'below')`` / ``(None, 'above')`` outside the frontier's GFLOPs range.
    """
    if gflops < front[0][0]:
        return None, 'below'
    if gflops > front[-1][0]:
        return None, 'above'
    for (g0, m0), (g1, m1) in zip(front, front[1:]):
        if g0 <= gflops <= g1:
            return (m0 if g1 == g0 else m0 + (m1 - m0) * (gflops - g0) / (g1 - g0)), ''
    return front[0][1], ''


def interpolate_gflops(front: Sequence[Tuple[float, float]], miou: float) -> Tuple[Optional[float], str]:
    """Lowest GFLOPs at which a frontier reaches ``miou``, linear between points (``(None, 'below')`` when even its
    cheapest point is better, ``(None, 'above')`` when it never gets there)."""
    if miou < front[0][1]:
        return None, 'below'
    if miou > front[-1][1]:
        return None, 'above'
    for (g0, m0), (g1, m1) in zip(front, front[1:]):
        if m0 <= miou <= m1:
            return (g0 if m1 == m0 else g0 + (g1 - g0) * (miou - m0) / (m1 - m0)), ''
    return front[0][0], ''


def matched_cost(rows: List[dict], ref_values: Sequence[float], drops: Sequence[float]) -> dict:
    """For every family: mIoU at the GFLOPs of the ADP-C reference settings, GFLOPs at their mIoU minus drops."""
    by_family: Dict[str, List[dict]] = {}
    for r in rows:
        by_family.setdefault(r['family_text'], []).append(r)
    adpc = {r['value']: r for r in rows if r['family'] == 'adpc'}
    refs = [adpc[v] for v in ref_values if v in adpc]
    out = dict(
        reference=[dict(t=r['value'], gflops_2_30=r['gflops_2_30'], mIoU=r['mIoU']) for r in refs],
        drops=list(drops),
        families=[])
    if not refs:
        return out
    base = refs[0]['mIoU']
    for text, fam_rows in by_family.items():
        pts = [(r['gflops_2_30'], r['mIoU']) for r in fam_rows]
        front = [pts[i] for i in frontier(pts)]
        at_g = [interpolate_miou(front, r['gflops_2_30']) for r in refs]
        at_m = [interpolate_gflops(front, base - d) for d in drops]
        out['families'].append(
            dict(
                family=text,
                title=fam_rows[0]['family_title'],
                miou_at_gflops=[dict(t=r['value'], value=v, out_of_range=o) for r, (v, o) in zip(refs, at_g)],
                gflops_at_miou=[dict(drop=d, value=v, out_of_range=o) for d, (v, o) in zip(drops, at_m)]))
    return out
