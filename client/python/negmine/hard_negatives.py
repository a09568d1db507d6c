"""mine_hard_negatives: sentence-transformers' hard-negative mining, with a
negmine server doing the search.

    import negmine
    rows = negmine.mine_hard_negatives(
        queries=questions, positives=answers, corpus=passages,
        encoder=lambda texts: model.encode(texts, normalize_embeddings=True),
        relative_margin=0.05, num_negatives=5, server="127.0.0.1:50051")
    rows[0]   # {"anchor": ..., "positive": ..., "negative": ...}

The parameters that sentence-transformers' `util.mine_hard_negatives` has
keep its names and meanings (range_min, range_max, max_score, min_score,
absolute_margin, relative_margin, num_negatives, sampling_strategy,
output_format, output_scores, batch_size); where negmine does a thing
differently, the docstring says how. The result is a list of dicts, one per
row, with sentence-transformers' column names; this package depends on
neither pandas nor datasets (`datasets.Dataset.from_list(rows)` makes a
Dataset of it).
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from negmine import _arrays
from negmine.client import Client
from negmine.local_server import LocalServer

__all__ = ["mine_hard_negatives", "SAMPLING_STRATEGIES", "OUTPUT_FORMATS"]

SAMPLING_STRATEGIES = ("top", "random", "softmax", "simans")
OUTPUT_FORMATS = ("triplet", "n-tuple", "labeled-pair", "labeled-list")


def _host(x: Any) -> np.ndarray:
    if _arrays.is_torch(x):
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows x dim); got shape {a.shape}")
    return a


def _encode(encoder: Callable[[List[str]], Any], texts: List[str],
            batch_size: int) -> np.ndarray:
    parts = [_host(encoder(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts, axis=0)


def _as_list(p: Any) -> List[Any]:
    if isinstance(p, (str, bytes)) or np.ndim(p) == 0:
        return [p]
    return list(p)


def _pairs_from_texts(queries: Sequence[str], positives: Sequence[Any],
                      corpus: Optional[Sequence[str]]
                      ) -> Tuple[List[str], List[str], List[List[int]], List[Tuple[int, int]]]:
    """(unique queries, corpus, positive corpus rows per unique query, the
    (unique query, positive row) pairs in input order)."""
    if len(queries) != len(positives):
        raise ValueError(f"{len(queries)} queries and {len(positives)} positives: "
                         "give one positive (or a list of them) per query")
    # As sentence-transformers: the corpus is corpus + positives, deduplicated
    # in order; equal query texts are one query with all their positives.
    texts = list(corpus or [])
    for p in positives:
        texts.extend(_as_list(p))
    corpus_texts = list(dict.fromkeys(texts))
    row_of = {t: i for i, t in enumerate(corpus_texts)}
    unique = list(dict.fromkeys(queries))
    qrow = {q: i for i, q in enumerate(unique)}
    pos_rows: List[List[int]] = [[] for _ in unique]
    pairs = []
    for q, p in zip(queries, positives):
        for text in _as_list(p):
            qi, pi = qrow[q], row_of[text]
            if pi not in pos_rows[qi]:
                pos_rows[qi].append(pi)
            pairs.append((qi, pi))
    return unique, corpus_texts, pos_rows, pairs


def _connect(server: Union[Client, str, None],
             server_bin: Optional[str]) -> Tuple[Client, Callable[[], None]]:
    """A client, and what to call when done (close it, stop a local server)."""
    if isinstance(server, Client):
        return server, lambda: None
    if isinstance(server, str):
        client = Client(server)
        return client, client.close
    binary = server_bin or os.environ.get("NEGMINE_SERVER_BIN") or shutil.which("negmine-server")
    if not binary:
        raise ValueError("mine_hard_negatives needs a server: pass server= (a negmine.Client "
                         "or \"host:port\"), or server_bin= (or $NEGMINE_SERVER_BIN, or "
                         "negmine-server on $PATH) to start a local one")
    local = LocalServer(binary, ["--worker_threads=1"]).start()
    try:
        local.wait_port()
        client = Client(local.address)
    except BaseException:
        local.stop()
        raise

    def done() -> None:
        client.close()
        local.stop()

    return client, done


def mine_hard_negatives(
        queries: Optional[Sequence[str]] = None,
        positives: Optional[Sequence[Any]] = None,
        corpus: Optional[Sequence[str]] = None,
        *,
        encoder: Optional[Callable[[List[str]], Any]] = None,
        query_embeddings: Any = None,
        corpus_embeddings: Any = None,
        positive_ids: Any = None,
        server: Union[Client, str, None] = None,
        server_bin: Optional[str] = None,
        collection: Optional[str] = None,
        metric: str = "cosine",
        range_min: int = 0,
        range_max: Optional[int] = None,
        max_score: Optional[float] = None,
        min_score: Optional[float] = None,
        absolute_margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        num_negatives: int = 3,
        sampling_strategy: str = "top",
        temperature: Optional[float] = None,
        simans_a: Optional[float] = None,
        simans_b: Optional[float] = None,
        dedupe_cosine: Optional[float] = None,
        output_format: str = "triplet",
        output_scores: bool = False,
        batch_size: int = 32,
        anchor_column_name: str = "anchor",
        positive_column_name: str = "positive",
        seed: int = 0,
        verbose: bool = False) -> List[Dict[str, Any]]:
    """Mines hard negatives for (anchor, positive) pairs.

    Input, one of:
      - texts and an encoder: `queries` (the anchors), `positives` (one
        text, or a list of texts, per query: the pairs), `corpus` (more
        candidate texts, or None), and `encoder`, a callable from a list of
        texts to an embeddings array [n, dim] (numpy or torch), called with
        at most `batch_size` texts at a time. As in sentence-transformers,
        the candidates are corpus + positives deduplicated, and equal query
        texts are one query holding all their positives. Rows hold texts.
      - embeddings: `query_embeddings` [Q, dim], `corpus_embeddings` [N,
        dim] and `positive_ids`, one corpus row (or a list of rows) per
        query. Rows hold ids: the query's row and corpus rows.

    The server: `server` is a negmine.Client or "host:port"; None starts a
    local negmine-server (`server_bin`, else $NEGMINE_SERVER_BIN, else
    negmine-server on $PATH) and stops it at the end. The corpus goes into
    a fresh collection (`collection`, default a random name; dropped at the
    end) of `metric` ("cosine", the default, scores as sentence-transformers
    does with normalized embeddings; "ip": inner product). The positives are
    sent with the queries (MineRequest.positives): never candidates, and
    their scores drive the margins.

    Filters (the server's MineFilters; None = off), as in
    sentence-transformers, with s_pos the query's lowest positive score:
      max_score: drop s > max_score. min_score: drop s < min_score.
      absolute_margin: drop s > s_pos - absolute_margin.
      relative_margin: drop s > s_pos - |s_pos| * relative_margin.
      dedupe_cosine (negmine only): drop a candidate whose cosine to a
        positive or to a negative already taken is >= dedupe_cosine.
    A removed target is not a candidate: every strategy below chooses
    among the eligible ones, ranked by score, best first.

    sampling_strategy, and what range_min / range_max mean for each:
      "top": the num_negatives best eligible targets after skipping the
        range_min best (rank_offset = range_min). range_max only checks
        range_max - range_min >= num_negatives. sentence-transformers
        filters inside the range_max highest raw scores, so when its
        filters empty that window it returns fewer; negmine filters over
        the whole collection, so it goes deeper and still returns
        num_negatives when there are that many eligible targets.
      "random": num_negatives drawn uniformly without replacement from the
        eligible ranks [range_min, range_max) (a top-k of range_max -
        range_min after rank_offset = range_min, then a choice on this side
        with numpy's generator seeded by `seed`; 0: fresh entropy), sorted
        by score as sentence-transformers sorts them. The window counts
        eligible targets; sentence-transformers' counts raw ranks and then
        drops the filtered ones, so with filters on its window holds fewer
        candidates than this one. range_max None:
        range_min + 10 * num_negatives when a margin or max_score is set,
        else range_min + num_negatives (sentence-transformers' default
        without its + max positives term: the positives are never in the
        ranking here).
      "softmax" (negmine only): num_negatives draws without replacement
        from softmax(s / temperature) over the eligible targets after the
        range_min best; `temperature` is required. range_max must be None
        (the draws are over every eligible target).
      "simans" (negmine only): SimANS draws, weights exp(-a (s - s_pos -
        b)^2) (simans_a, simans_b: None for the server's 0.5 and 0), over a
        pool of the range_max - range_min best eligible targets after the
        range_min best (range_max None: the server's max(k, 100)).

    output_format, with sentence-transformers' columns (anchor_column_name
    and positive_column_name name the first two):
      "triplet": one row per (anchor, positive, negative).
      "n-tuple": one row per (anchor, positive) pair: negative_1 ..
        negative_n; pairs with fewer than num_negatives negatives are left
        out, as sentence-transformers does.
      "labeled-pair": per query, a row per positive (label 1) then a row
        per negative (label 0): anchor, positive column (the document),
        label.
      "labeled-list": one row per (anchor, positive) pair with negatives:
        the documents [positive, negatives...] and labels [1, 0, ...].
    output_scores: "triplet" and "n-tuple" gain "scores" ([positive score,
    negative scores...]); "labeled-pair" has "score" and "labeled-list"
    "scores" instead of their labels.

    verbose: print how many targets each filter removed and how many
    queries fell short.

    Returns:
        The rows, a list of dicts.
    """
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling_strategy = {sampling_strategy!r}; expected one of "
                         f"{SAMPLING_STRATEGIES}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format = {output_format!r}; expected one of {OUTPUT_FORMATS}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if range_min < 0:
        raise ValueError(f"range_min must be non-negative, got {range_min}")
    text_mode = queries is not None
    if text_mode:
        if encoder is None or positives is None:
            raise ValueError("texts need positives= and encoder=")
        if query_embeddings is not None or corpus_embeddings is not None:
            raise ValueError("give texts (queries, positives, corpus, encoder) or embeddings "
                             "(query_embeddings, corpus_embeddings, positive_ids), not both")
        unique, corpus_texts, pos_rows, pairs = _pairs_from_texts(queries, positives, corpus)
        q_emb = _encode(encoder, unique, batch_size)
        c_emb = _encode(encoder, corpus_texts, batch_size)
    else:
        if query_embeddings is None or corpus_embeddings is None or positive_ids is None:
            raise ValueError("give queries, positives and an encoder, or query_embeddings, "
                             "corpus_embeddings and positive_ids")
        q_emb, c_emb = _host(query_embeddings), _host(corpus_embeddings)
        pos_rows = [[int(i) for i in _as_list(p)] for p in positive_ids]
        if len(pos_rows) != len(q_emb):
            raise ValueError(f"{len(pos_rows)} positive lists for {len(q_emb)} queries")
        for row in pos_rows:
            if not row or min(row) < 0 or max(row) >= len(c_emb):
                raise ValueError(f"positive_ids {row} are not rows of the corpus "
                                 f"(0..{len(c_emb) - 1}), or empty")
        pairs = [(qi, pi) for qi, row in enumerate(pos_rows) for pi in row]
        unique = corpus_texts = None
    if q_emb.shape[1] != c_emb.shape[1]:
        raise ValueError(f"queries have dim {q_emb.shape[1]}, the corpus {c_emb.shape[1]}")

    filtered = absolute_margin is not None or relative_margin is not None or max_score is not None
    options: Dict[str, Any] = dict(
        rank_offset=int(range_min), min_score=min_score, max_score=max_score,
        absolute_margin=absolute_margin, relative_margin=relative_margin,
        dedupe_cosine=dedupe_cosine, seed=int(seed))
    if sampling_strategy in ("top", "random"):
        if range_max is None and sampling_strategy == "random":
            range_max = range_min + num_negatives * (10 if filtered else 1)
        if range_max is not None and num_negatives > range_max - range_min:
            raise ValueError(f"cannot mine {num_negatives} negatives per query from ranks "
                             f"[{range_min}, {range_max})")
        k = num_negatives if sampling_strategy == "top" else range_max - range_min
        options.update(mode="topk")
    elif sampling_strategy == "softmax":
        if temperature is None or temperature <= 0:
            raise ValueError("sampling_strategy = 'softmax' needs a temperature > 0")
        if range_max is not None:
            raise ValueError("range_max has no meaning for 'softmax': the draws are over every "
                             "eligible target (use range_min, the filters, or 'simans')")
        k = num_negatives
        options.update(mode="sample", temperature=float(temperature))
    else:  # simans
        if range_max is not None and range_max - range_min < num_negatives:
            raise ValueError(f"the SimANS pool [{range_min}, {range_max}) holds fewer than "
                             f"{num_negatives} targets")
        k = num_negatives
        # SimANS's weights do not use the temperature; the request still
        # carries one, as every sampling request does.
        options.update(mode="sample", distribution="simans", simans_a=simans_a,
                       simans_b=simans_b, temperature=1.0 if temperature is None else temperature,
                       simans_candidates=0 if range_max is None else range_max - range_min)

    # The server takes k up to the collection's size; fewer eligible targets
    # come back as a shortfall either way.
    k = min(k, len(c_emb))
    if options.get("simans_candidates"):
        options["simans_candidates"] = min(options["simans_candidates"], len(c_emb))
    client, done = _connect(server, server_bin)
    name = collection or f"hard-negatives-{uuid.uuid4().hex[:12]}"
    try:
        client.wait_ready()
        client.create_collection(name, dim=int(c_emb.shape[1]), metric=metric)
        try:
            client.upsert(name, ids=np.arange(len(c_emb), dtype=np.int64), vectors=c_emb)
            result = client.mine(q_emb, int(k), collection=name, positives=pos_rows, **options)
        finally:
            client.drop_collection(name)
    finally:
        done()

    if result.positive_scores.shape[1] < max(len(rows) for rows in pos_rows):
        # A server older than MineRequest.positives ignores them: it neither
        # excludes them nor filters by them.
        raise RuntimeError(f"the server at {client.address} did not score the positives: it "
                           "predates MineRequest.positives and the filters")
    # Per unique query: the negatives (corpus rows, scores; best first) and
    # each positive's score.
    rng = np.random.default_rng(seed if seed else None)
    negatives: List[List[Tuple[int, float]]] = []
    for qi in range(len(q_emb)):
        n = int(result.counts[qi])
        got = [(int(result.ids[qi, j]), float(result.scores[qi, j])) for j in range(n)]
        if sampling_strategy == "random" and len(got) > num_negatives:
            picked = rng.choice(len(got), size=num_negatives, replace=False)
            got = sorted((got[j] for j in picked), key=lambda t: (-t[1], t[0]))
        negatives.append(got)
    pos_score = [{row: float(result.positive_scores[qi, j]) for j, row in enumerate(rows)}
                 for qi, rows in enumerate(pos_rows)]
    if verbose:
        _report(result, num_negatives, len(q_emb))

    def anchor(qi: int) -> Any:
        return unique[qi] if text_mode else qi

    def doc(row: int) -> Any:
        return corpus_texts[row] if text_mode else row

    a_col, p_col = anchor_column_name, positive_column_name
    out: List[Dict[str, Any]] = []
    if output_format == "triplet":
        for qi, pi in pairs:
            for row, s in negatives[qi]:
                r = {a_col: anchor(qi), p_col: doc(pi), "negative": doc(row)}
                if output_scores:
                    r["scores"] = [pos_score[qi][pi], s]
                out.append(r)
    elif output_format == "n-tuple":
        for qi, pi in pairs:
            negs = negatives[qi]
            if len(negs) < num_negatives:
                continue
            r = {a_col: anchor(qi), p_col: doc(pi)}
            for j, (row, _) in enumerate(negs[:num_negatives], start=1):
                r[f"negative_{j}"] = doc(row)
            if output_scores:
                r["scores"] = [pos_score[qi][pi]] + [s for _, s in negs[:num_negatives]]
            out.append(r)
    elif output_format == "labeled-pair":
        key = "score" if output_scores else "label"
        for qi in range(len(q_emb)):
            for pi in pos_rows[qi]:
                out.append({a_col: anchor(qi), p_col: doc(pi),
                            key: pos_score[qi][pi] if output_scores else 1})
            for row, s in negatives[qi]:
                out.append({a_col: anchor(qi), p_col: doc(row), key: s if output_scores else 0})
    else:  # labeled-list
        for qi, pi in pairs:
            negs = negatives[qi]
            if not negs:
                continue
            r = {a_col: anchor(qi), p_col: [doc(pi)] + [doc(row) for row, _ in negs]}
            if output_scores:
                r["scores"] = [pos_score[qi][pi]] + [s for _, s in negs]
            else:
                r["labels"] = [1] + [0] * len(negs)
            out.append(r)
    return out


def _report(result: Any, num_negatives: int, num_queries: int) -> None:
    removed = result.removed
    for name in ("max_score", "min_score", "absolute_margin", "relative_margin", "dedupe"):
        total = int(np.sum(getattr(removed, name)))
        if total:
            print(f"{name} removed {total:,} candidate negatives")
    short = sum(1 for s in result.shortfall if s)
    if short:
        print(f"{short} of {num_queries} queries got fewer than the negatives asked for; "
              f"for example: {next(s for s in result.shortfall if s)}")
