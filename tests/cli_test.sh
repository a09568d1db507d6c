#!/usr/bin/env bash
# The negmine CLI end to end against a real server: generate, create, upsert
# from .npy (with ids) and .fvecs, mine as a table, as JSON and into .npy, and
# a clear error with exit code 2 on bad input; positives, filters and the
# trainer formats (jsonl, tevatron, st-ntuple, st-triplet).
# usage: cli_test.sh NEGMINE_SERVER_BIN NEGMINE_CLI_BIN
set -euo pipefail
server_bin=$1
cli=$2
tmp=$(mktemp -d /tmp/negmine-cli-XXXXXX)
pid=
pid2=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  [ -n "$pid2" ] && kill "$pid2" 2>/dev/null && wait "$pid2" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

mport=$(/usr/bin/python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$server_bin" --listen=127.0.0.1:0 --port_file="$tmp/port" --data_dir="$tmp/data" \
  --metrics_listen="127.0.0.1:$mport" --log_level=warning --default_dim=16 --generate_targets=2000 \
  --max_sync_batch_examples=1000 --snapshot_interval_seconds=1 &
pid=$!
for _ in $(seq 600); do [ -s "$tmp/port" ] && break; sleep 0.05; done
[ -s "$tmp/port" ] || fail "server did not start"
nm() { "$cli" --server "127.0.0.1:$(cat "$tmp/port")" "$@"; }

nm health | grep -q SERVING || fail "health"
"$cli" generate --queries 3 --dim 16 --seed 4 --out "$tmp/q.npy" >/dev/null
nm info --collection default | grep -q "targets=2000" || fail "info"

# Table, JSON and .npy output of the same top-k agree.
nm mine --collection default --queries "$tmp/q.npy" --k 5 > "$tmp/table.txt"
grep -q "top-k" "$tmp/table.txt" || fail "table output"
nm mine --collection default --queries "$tmp/q.npy" --k 5 --json > "$tmp/out.json"
[ "$(wc -l < "$tmp/out.json")" = 3 ] || fail "one JSON line per query"
nm mine --collection default --queries "$tmp/q.npy" --k 5 --out "$tmp/r.npy" 2>/dev/null
/usr/bin/python3 - "$tmp" <<'PY' || fail "JSON and .npy disagree"
import json, sys, numpy as np
tmp = sys.argv[1]
rows = [json.loads(l) for l in open(tmp + "/out.json")]
ids = np.load(tmp + "/r.npy")
scores = np.load(tmp + "/r.scores.npy")
assert ids.shape == (3, 5) and ids.dtype == np.uint64, ids
for i, r in enumerate(rows):
    assert r["ids"] == ids[i].tolist(), (r, ids[i])
    assert np.allclose(r["scores"], scores[i], atol=1e-6)
    assert r["scores"] == sorted(r["scores"], reverse=True)
PY

# Sampling prints log q; exclusions from an .npy are honored.
nm mine --collection default --queries "$tmp/q.npy" --k 4 --mode sample \
  --temperature 0.1 --sample-seed 3 --json | grep -q '"log_q"' || fail "sample"
/usr/bin/python3 -c "
import json, numpy as np
rows = [json.loads(l) for l in open('$tmp/out.json')]
np.save('$tmp/ex.npy', np.array([r['ids'][:2] for r in rows], dtype=np.int64))"
nm mine --collection default --queries "$tmp/q.npy" --k 5 --exclude "$tmp/ex.npy" --json \
  > "$tmp/ex.json"
/usr/bin/python3 - "$tmp" <<'PY' || fail "exclusions"
import json, sys
tmp = sys.argv[1]
before = [json.loads(l) for l in open(tmp + "/out.json")]
after = [json.loads(l) for l in open(tmp + "/ex.json")]
for b, a in zip(before, after):
    assert not set(b["ids"][:2]) & set(a["ids"]), (b, a)
    assert a["ids"][:3] == b["ids"][2:], (b, a)
PY

# Hashed 64-bit ids (2^63 and above) are excluded like any other: a uint64
# --exclude array is read as uint64 (2^64-1 is its padding), an int64 one
# reads negative entries as padding.
nm create --collection hashed --dim 4 --metric inner_product --index exact >/dev/null
/usr/bin/python3 -c "
import numpy as np
rng = np.random.default_rng(5)
np.save('$tmp/hx.npy', rng.standard_normal((50, 4)).astype(np.float32))
np.save('$tmp/hids.npy', (np.uint64(2**63 + 12345) + np.arange(50, dtype=np.uint64)))
np.save('$tmp/hq.npy', rng.standard_normal((4, 4)).astype(np.float32))"
nm upsert --collection hashed --npy "$tmp/hx.npy" --ids "$tmp/hids.npy" | grep -q "upserted 50" \
  || fail "upsert hashed ids"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --json > "$tmp/h0.json"
/usr/bin/python3 -c "
import json, numpy as np
rows = [json.loads(l) for l in open('$tmp/h0.json')]
assert all(min(r['ids']) >= 2**63 for r in rows), rows
ex = np.full((4, 3), np.iinfo(np.uint64).max, dtype=np.uint64)
for i, r in enumerate(rows): ex[i, :2] = r['ids'][:2]   # last column: padding
np.save('$tmp/hex.npy', ex)"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --exclude "$tmp/hex.npy" --json \
  > "$tmp/h1.json"
/usr/bin/python3 - "$tmp" <<'PY' || fail "uint64 exclusions >= 2^63"
import json, sys
tmp = sys.argv[1]
before = [json.loads(l) for l in open(tmp + "/h0.json")]
after = [json.loads(l) for l in open(tmp + "/h1.json")]
for b, a in zip(before, after):
    assert not set(b["ids"][:2]) & set(a["ids"]), (b, a)
    assert a["ids"][0] == b["ids"][2], (b, a)
PY
/usr/bin/python3 -c "
import numpy as np
ex = np.load('$tmp/ex.npy'); ex = np.concatenate([ex, np.full((3, 1), -1, np.int64)], 1)
np.save('$tmp/ex_pad.npy', ex)"
nm mine --collection default --queries "$tmp/q.npy" --k 5 --exclude "$tmp/ex_pad.npy" --json \
  | cmp -s - "$tmp/ex.json" || fail "int64 exclusions with -1 padding"

# Log Z only when asked (--log-z): then in the table, the JSON and
# R.log_z.npy, and equal to logsumexp(s / tau) over the targets (an exact
# index: the interval is the value).
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --mode sample --temperature 0.5 \
  --sample-seed 1 > "$tmp/s_table.txt"
grep -q "log Z" "$tmp/s_table.txt" && fail "log Z computed though not asked for"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --mode sample --temperature 0.5 \
  --sample-seed 1 --json > "$tmp/s_nolz.json"
grep -q "log_z" "$tmp/s_nolz.json" && fail "log Z in JSON though not asked for"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --mode sample --temperature 0.5 \
  --sample-seed 1 --log-z | grep -q "log Z in" || fail "table without log Z"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --mode sample --temperature 0.5 \
  --sample-seed 1 --log-z --json > "$tmp/s_lz.json"
nm mine --collection hashed --queries "$tmp/hq.npy" --k 3 --mode sample --temperature 0.5 \
  --sample-seed 1 --log-z --out "$tmp/s_lz.npy" 2>/dev/null
/usr/bin/python3 - "$tmp" <<'PY' || fail "log Z"
import json, sys, numpy as np
tmp = sys.argv[1]
x, q = np.load(tmp + "/hx.npy").astype(np.float64), np.load(tmp + "/hq.npy").astype(np.float64)
s = q @ x.T / 0.5
truth = s.max(1) + np.log(np.exp(s - s.max(1, keepdims=True)).sum(1))
rows = [json.loads(l) for l in open(tmp + "/s_lz.json")]
bounds = np.load(tmp + "/s_lz.log_z.npy")
assert bounds.shape == (4, 2) and bounds.dtype == np.float64, bounds
for i, r in enumerate(rows):
    assert abs(r["log_z_lo"] - truth[i]) < 1e-4 and abs(r["log_z_hi"] - truth[i]) < 1e-4, (r, truth[i])
    assert np.allclose(bounds[i], [r["log_z_lo"], r["log_z_hi"]], atol=1e-6), (bounds[i], r)
    # The first draw comes from the full softmax: log q = s / tau - log Z.
    row = r["ids"][0] - (2**63 + 12345)
    assert abs(r["log_q"][0] - (s[i, row] - truth[i])) < 1e-4, (r, s[i, row] - truth[i])
PY

# Inner product is the default metric (what the API's METRIC_UNSPECIFIED
# means); cosine is asked for.
nm create --collection fmt --dim 8 --index exact | grep -q "metric=inner_product" \
  || fail "create's default metric"
nm create --collection fmtcos --dim 8 --metric cosine | grep -q "metric=cosine" \
  || fail "--metric cosine"

# Positives, filters and the trainer formats. 5 queries, 2 positives each
# (one row padded with -1); the ids of every format equal the jsonl run's,
# whose scores obey the margin and whose positive scores are q . p.
/usr/bin/python3 -c "
import numpy as np
rng = np.random.default_rng(9)
x = rng.standard_normal((300, 8))
pos = np.array([[3, 7], [10, -1], [20, 21], [30, 31], [40, 41]], np.int64)
# Each query near the sum of its positives: s_pos > 0.
q = np.stack([x[r[r >= 0]].sum(0) * (2 if (r < 0).any() else 1) for r in pos])
q += 0.3 * rng.standard_normal(q.shape)
np.save('$tmp/fx.npy', x.astype(np.float32))
np.save('$tmp/fq.npy', q.astype(np.float32))
np.save('$tmp/fpos.npy', pos)"
nm upsert --collection fmt --npy "$tmp/fx.npy" | grep -q "upserted 300" || fail "upsert fmt"
fmine() { nm mine --collection fmt --queries "$tmp/fq.npy" --k 4 --positives "$tmp/fpos.npy" \
  --relative-margin 0.2 "$@"; }
fmine --format jsonl > "$tmp/f.jsonl"
fmine --format tevatron > "$tmp/f.tev"
fmine --format st-ntuple > "$tmp/f.ntuple"
fmine --format st-triplet > "$tmp/f.triplet"
fmine > "$tmp/f.table"
grep -q "positive scores" "$tmp/f.table" || fail "table without positive scores"
/usr/bin/python3 - "$tmp" <<'PY' || fail "trainer formats"
import json, sys, numpy as np
tmp = sys.argv[1]
x = np.load(tmp + "/fx.npy").astype(np.float64)
q = np.load(tmp + "/fq.npy").astype(np.float64)
pos = [[int(i) for i in r if i >= 0] for r in np.load(tmp + "/fpos.npy")]
s = q @ x.T
rows = [json.loads(l) for l in open(tmp + "/f.jsonl")]
assert [r["query"] for r in rows] == list(range(5)), rows
keys = {"query", "positive_ids", "positive_scores", "ids", "scores", "log_q", "num_top", "count",
        "num_eligible", "removed", "shortfall", "index_version"}
for i, r in enumerate(rows):
    assert set(r) == keys, set(r) ^ keys
    assert r["positive_ids"] == pos[i], r
    assert np.allclose(r["positive_scores"], s[i, pos[i]], atol=1e-4), (r, s[i, pos[i]])
    s_pos = min(s[i, pos[i]])
    assert s_pos > 0, s_pos
    assert len(r["ids"]) == r["count"] == 4 and r["shortfall"] == "", r
    assert not set(r["ids"]) & set(pos[i]), r
    assert all(v <= s_pos - abs(s_pos) * 0.2 + 1e-4 for v in r["scores"]), (r, s_pos)
    assert np.allclose(r["scores"], s[i, r["ids"]], atol=1e-4), r
    assert r["removed"]["positives"] == len(pos[i]), r
    assert r["removed"]["relative_margin"] + r["num_eligible"] + len(pos[i]) == 300, r
tev = [json.loads(l) for l in open(tmp + "/f.tev")]
assert len(tev) == 5, tev
for i, (t, r) in enumerate(zip(tev, rows)):
    assert set(t) == {"query_id", "query", "positive_passages", "negative_passages"}, t
    assert t["query_id"] == str(i)
    assert [p["docid"] for p in t["positive_passages"]] == [str(p) for p in pos[i]], t
    assert [p["docid"] for p in t["negative_passages"]] == [str(n) for n in r["ids"]], t
    assert all(set(p) == {"docid", "title", "text"} for p in t["positive_passages"] + t["negative_passages"])
nt = [json.loads(l) for l in open(tmp + "/f.ntuple")]
assert len(nt) == sum(len(p) for p in pos), nt
want = [(i, p) for i in range(5) for p in pos[i]]
assert [(r["anchor"], r["positive"]) for r in nt] == want, nt
for r in nt:
    assert set(r) == {"anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"}, r
    assert [r["negative_%d" % j] for j in range(1, 5)] == rows[r["anchor"]]["ids"], r
tr = [json.loads(l) for l in open(tmp + "/f.triplet")]
assert len(tr) == 4 * len(want), len(tr)
assert [(r["anchor"], r["positive"], r["negative"]) for r in tr] == \
    [(i, p, n) for i, p in want for n in rows[i]["ids"]], tr
assert all(set(r) == {"anchor", "positive", "negative"} for r in tr)
PY
# A query with fewer than k negatives: jsonl says why; st-ntuple leaves it out.
fmine --format jsonl --k 295 > "$tmp/fs.jsonl"
fmine --format st-ntuple --k 295 > "$tmp/fs.ntuple" 2> "$tmp/fs.err"
/usr/bin/python3 - "$tmp" <<'PY' || fail "shortfall"
import json, sys
tmp = sys.argv[1]
rows = [json.loads(l) for l in open(tmp + "/fs.jsonl")]
short = [r["query"] for r in rows if r["count"] < 295]
assert short and all(rows[i]["shortfall"] for i in short), rows
assert all(r["count"] == r["num_eligible"] for r in rows if r["query"] in short)
nt = [json.loads(l) for l in open(tmp + "/fs.ntuple")]
assert not {r["anchor"] for r in nt} & set(short), nt
PY
grep -q "st-ntuple: left out" "$tmp/fs.err" || fail "no note on left-out rows"
set +e
err=$(nm mine --collection fmt --queries "$tmp/fq.npy" --k 4 --format st-triplet 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for st-triplet without --positives"
echo "$err" | grep -q -- "needs --positives" || fail "message: $err"
set +e
err=$(nm mine --collection fmt --queries "$tmp/fq.npy" --k 4 --format csv 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for --format csv"

# A new collection from .npy with explicit ids, and from .fvecs.
nm create --collection mine2 --dim 4 --metric inner_product >/dev/null
/usr/bin/python3 -c "
import numpy as np, struct
x = np.arange(12, dtype=np.float32).reshape(3, 4)
np.save('$tmp/x.npy', x)
np.save('$tmp/ids.npy', np.array([100, 200, 300], dtype=np.uint64))
with open('$tmp/x.fvecs', 'wb') as f:
    for row in x[::-1] * -1:
        f.write(struct.pack('<i', 4)); f.write(row.tobytes())"
nm upsert --collection mine2 --npy "$tmp/x.npy" --ids "$tmp/ids.npy" | grep -q "upserted 3" || fail "upsert npy"
nm upsert --collection mine2 --fvecs "$tmp/x.fvecs" --id-offset 1000 | grep -q "upserted 3" || fail "upsert fvecs"
nm info --collection mine2 | grep -q "targets=6" || fail "6 targets"
/usr/bin/python3 -c "import numpy as np; np.save('$tmp/q4.npy', np.ones((1, 4), np.float32))"
nm mine --collection mine2 --queries "$tmp/q4.npy" --k 2 --json | grep -q '"ids": \[300, 200\]' \
  || fail "top-2 over npy targets"

# A negative id is refused with exit code 2 and a message naming it, and
# nothing is stored; so is 2^64-1, the padding of the arrays negmine writes.
/usr/bin/python3 -c "
import numpy as np
np.save('$tmp/neg_ids.npy', np.array([400, -1, 500], dtype=np.int64))
np.save('$tmp/pad_ids.npy', np.array([400, 2**64 - 1, 500], dtype=np.uint64))"
for f in neg_ids pad_ids; do
  set +e
  err=$(nm upsert --collection mine2 --npy "$tmp/x.npy" --ids "$tmp/$f.npy" 2>&1 >/dev/null); rc=$?
  set -e
  [ "$rc" = 2 ] || fail "exit code $rc for $f"
  case $f in
    neg_ids) echo "$err" | grep -q "negative id -1 (row 1)" || fail "message: $err" ;;
    pad_ids) echo "$err" | grep -q "id 1 is 2^64-1" || fail "message: $err" ;;
  esac
done
set +e
err=$(nm delete --collection mine2 --ids 100,-1 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for delete --ids -1"
echo "$err" | grep -q "'-1' is negative" || fail "message: $err"
nm info --collection mine2 | grep -q "targets=6" || fail "a refused upsert stored something"

# Query files larger than one request: a second server with small limits
# (max_batch 100, 256 KiB messages). 3000 queries at k = 8 exceed max_batch;
# 90 at k = 512 fit max_batch but their results do not fit one message. The
# CLI splits both and the results, in query order, equal brute force over
# the same targets (`generate --targets` writes the ones --generate_targets
# serves).
"$server_bin" --listen=127.0.0.1:0 --port_file="$tmp/port2" --data_dir="$tmp/data2" \
  --metrics_listen= --log_level=warning --default_dim=16 --default_index=exact \
  --generate_targets=2000 --max_batch=100 --max_message_bytes=262144 &
pid2=$!
for _ in $(seq 600); do [ -s "$tmp/port2" ] && break; sleep 0.05; done
[ -s "$tmp/port2" ] || fail "second server did not start"
nm2() { "$cli" --server "127.0.0.1:$(cat "$tmp/port2")" "$@"; }
"$cli" generate --targets 2000 --dim 16 --seed 1 --out "$tmp/t2000.npy" >/dev/null
"$cli" generate --queries 3000 --dim 16 --seed 7 --out "$tmp/q3000.npy" >/dev/null
/usr/bin/python3 -c "
import numpy as np
np.save('$tmp/q600.npy', np.load('$tmp/q3000.npy')[:600])
np.save('$tmp/q90.npy', np.load('$tmp/q3000.npy')[:90])"
nm2 mine --collection default --queries "$tmp/q3000.npy" --k 8 --out "$tmp/big8.npy" 2>/dev/null \
  || fail "3000 queries over max_batch 100"
nm2 mine --collection default --queries "$tmp/q90.npy" --k 512 --out "$tmp/big512.npy" 2>/dev/null \
  || fail "90 x 512 results over a 256 KiB message limit"
nm2 mine --collection default --queries "$tmp/q600.npy" --k 4 --json > "$tmp/big4.json" \
  || fail "--json over several requests"
# Upsert messages fit the same limit (20000 x 16 floats is 1.3 MB).
nm2 create --collection up --dim 16 >/dev/null
nm2 upsert --collection up --random 20000 --seed 3 | grep -q "upserted 20000" \
  || fail "upsert over a 256 KiB message limit"
kill "$pid2"; wait "$pid2" 2>/dev/null || true
/usr/bin/python3 - "$tmp" <<'PY' || fail "split results differ from brute force"
import json, sys, numpy as np
tmp = sys.argv[1]
t = np.load(tmp + "/t2000.npy").astype(np.float64)
t /= np.linalg.norm(t, axis=1, keepdims=True)
q = np.load(tmp + "/q3000.npy").astype(np.float64)
q /= np.linalg.norm(q, axis=1, keepdims=True)
s = q @ t.T
def check(ids, scores, k):
    n = ids.shape[0]
    assert ids.shape == (n, k) and ids.dtype == np.uint64, ids.shape
    want = np.sort(s[:n], axis=1)[:, ::-1][:, :k]
    assert np.allclose(scores, want, atol=1e-5), np.abs(scores - want).max()
    got = np.take_along_axis(s[:n], ids.astype(np.int64), axis=1)
    assert np.allclose(got, want, atol=1e-5)  # each id holds the score it claims
    assert all(len(set(r)) == k for r in ids.tolist())
check(np.load(tmp + "/big8.npy"), np.load(tmp + "/big8.scores.npy"), 8)
check(np.load(tmp + "/big512.npy"), np.load(tmp + "/big512.scores.npy"), 512)
rows = [json.loads(l) for l in open(tmp + "/big4.json")]
assert [r["query"] for r in rows] == list(range(600)), "JSON lines not in query order"
check(np.array([r["ids"] for r in rows], dtype=np.uint64), np.array([r["scores"] for r in rows]), 4)
PY

# Drift: landmarks, a simulated update, a landmark file, a linear map.
nm create --collection drifty --dim 16 --num-landmarks 64 >/dev/null
nm upsert --collection drifty --random 2000 --seed 3 >/dev/null
nm landmarks --collection drifty --ids-out "$tmp/lm.npy" | grep -q "landmark epoch 1: 64 landmarks" \
  || fail "landmarks"
nm landmarks --collection drifty --json --ids-out "$tmp/lm2.npy" > "$tmp/lm.json"
/usr/bin/python3 -c "
import json, numpy as np
j = json.load(open('$tmp/lm.json'))
assert j['landmark_epoch'] == 1 and j['num_landmarks'] == 64, j
assert j['ids'] == np.load('$tmp/lm.npy').ravel().tolist() == np.load('$tmp/lm2.npy').ravel().tolist()
" || fail "landmarks --json"
# The old name still works, with a note.
nm landmarks --collection drifty --out "$tmp/lm_old.npy" 2> "$tmp/lm_old.err" >/dev/null
grep -q "deprecated: use --ids-out" "$tmp/lm_old.err" || fail "no deprecation note"
cmp -s "$tmp/lm.npy" "$tmp/lm_old.npy" || fail "landmarks --out"
nm drift --collection drifty --model-step 5 --simulate --seed 3 | grep -q "drift at step 5: kernel=" \
  || fail "drift --simulate"
nm info --collection drifty | grep -q "drift: step=5" || fail "info shows the drift state"
/usr/bin/python3 -c "
import numpy as np
ids = np.load('$tmp/lm.npy')
assert ids.shape == (64, 1) and ids.dtype == np.uint64, (ids.shape, ids.dtype)
np.save('$tmp/g.npy', np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32))
np.save('$tmp/eye.npy', np.eye(16, dtype=np.float32))"
nm drift --collection drifty --model-step 6 --landmark-embeddings "$tmp/g.npy" --epoch 1 \
  | grep -q "step 6" || fail "drift --landmark-embeddings"
nm drift --collection drifty --model-step 7 --linear-a "$tmp/eye.npy" | grep -q "re-based" \
  || fail "drift --linear-a"
set +e
err=$(nm drift --collection drifty --model-step 8 --landmarks "$tmp/g.npy" --epoch 1 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 1 ] || fail "exit code $rc for a stale landmark epoch"
echo "$err" | grep -q "FAILED_PRECONDITION" || fail "message: $err"
echo "$err" | grep -q "deprecated: use --landmark-embeddings" || fail "no deprecation note: $err"

# Batches: 500 examples and 2000, above the server's synchronous limit (1000
# here). Both run as a job asked for up front: no call fails on the way
# (the server counts no RESOURCE_EXHAUSTED AssignBatches). --sync makes one
# synchronous call, refused above the limit with a message saying so.
/usr/bin/python3 -c "
import numpy as np
rng = np.random.default_rng(3)
centers = rng.standard_normal((20, 16))
y = centers[rng.integers(0, 20, 2000)] + 0.2 * rng.standard_normal((2000, 16))
x = y + 0.2 * rng.standard_normal((2000, 16))
np.save('$tmp/bx.npy', x.astype(np.float32)); np.save('$tmp/by.npy', y.astype(np.float32))
np.save('$tmp/bx500.npy', x[:500].astype(np.float32)); np.save('$tmp/by500.npy', y[:500].astype(np.float32))"
nm batches --queries "$tmp/bx500.npy" --positives "$tmp/by500.npy" --batch-size 64 \
  --out "$tmp/b500.npy" | grep -q "8 batches of 64 from 500 examples" || fail "batches sync"
nm batches --queries "$tmp/bx.npy" --positives "$tmp/by.npy" --batch-size 64 \
  --out "$tmp/b.npy" 2>/dev/null | grep -q "32 batches of 64 from 2000 examples" || fail "batches as a job"
/usr/bin/python3 -c "
import numpy as np
b = np.load('$tmp/b.npy')
assert b.shape == (32, 64) and b.dtype == np.uint64, (b.shape, b.dtype)
ids = b[b != np.iinfo(np.uint64).max]
assert sorted(ids.tolist()) == list(range(2000)), 'not a partition'
b = np.load('$tmp/b500.npy')
pad = (b == np.iinfo(np.uint64).max).sum(axis=1)
assert sorted(pad.tolist()) == [0] * 7 + [12], pad  # one short batch (shuffled in place)
assert sorted(b[b < 500].tolist()) == list(range(500))
" || fail "batches.npy is not a partition"
/usr/bin/python3 - "$mport" <<'PY' || fail "batches made a call that failed"
import re, sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=10).read().decode()
calls = {}
for line in text.splitlines():
    if line.startswith("negmine_requests_total{") and 'method="AssignBatches"' in line:
        code = re.search(r'code="([A-Z_]+)"', line).group(1)
        calls[code] = calls.get(code, 0) + float(line.rsplit(" ", 1)[1])
assert calls.get("OK", 0) >= 2 and set(calls) == {"OK"}, calls
PY
nm batches --queries "$tmp/bx500.npy" --positives "$tmp/by500.npy" --batch-size 64 --sync \
  --out "$tmp/b500s.npy" | grep -q "8 batches of 64 from 500 examples" || fail "batches --sync"
cmp -s "$tmp/b500.npy" "$tmp/b500s.npy" || fail "a job and a synchronous call disagree"
set +e
err=$(nm batches --queries "$tmp/bx.npy" --positives "$tmp/by.npy" --batch-size 64 --sync \
  --out "$tmp/bs.npy" 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 1 ] || fail "exit code $rc for --sync above the limit"
echo "$err" | grep -q "RESOURCE_EXHAUSTED.*max_sync_batch_examples" || fail "message: $err"

# Help: every option of every command with its default; one command's
# help alone; --version.
nm help > "$tmp/help.txt"
for want in "--k K  *default 10" "--num-hard H  *default k/2" "--mode topk|sample|mixed  *default topk" \
    "--temperature T  *required for sample and mixed" "--sample-seed S  *default 0" \
    "--metric inner_product|cosine  *default inner_product" "--index tree|exact  *default tree" \
    "--format table|json|jsonl|tevatron|st-ntuple|st-triplet" "--positives P.npy  *default none" \
    "--relative-margin M  *default off" "--distribution softmax|simans  *default softmax" \
    "--leaf-size L  *default 64" "--timeout-seconds T  *default 5" "--neighbors K  *default 0" \
    "--model-step T  *default 0" "--log-z \[--log-z-width W\]  *default off; W default 0.01" \
    "float32, float16 or float64"; do
  grep -q -- "$want" "$tmp/help.txt" || fail "help lacks '$want'"
done
"$cli" mine --help > "$tmp/help_mine.txt"
grep -q -- "--k K  *default 10" "$tmp/help_mine.txt" || fail "mine --help"
grep -q -- "--dim D" "$tmp/help_mine.txt" && fail "mine --help shows other commands"
"$cli" help batches | grep -q -- "--sync  *default off" || fail "help batches"
"$cli" --version | grep -Eq "^negmine [0-9]+\.[0-9]+\.[0-9]+" || fail "--version"
# Every command that the help lists has its own help and is dispatched: a
# stray option is refused by the command itself (exit 2, naming the option
# and the command), before it writes anything.
cmds=$(sed -n '/^commands:$/,$ s/^  \([a-z][a-z]*\)\( .*\)*$/\1/p' "$tmp/help.txt" | grep -v '^help$' | sort -u)
[ "$(echo "$cmds" | wc -l)" = 13 ] || fail "help lists $(echo "$cmds" | wc -l) commands: $cmds"
for c in $cmds; do
  # Through a file: grep -q on a pipe would stop reading at its match, and a
  # help text longer than one pipe write would then end the CLI by SIGPIPE.
  "$cli" help "$c" > "$tmp/help_$c.txt" || fail "help $c: exit code"
  grep -q "^usage: negmine \[global options\] $c " "$tmp/help_$c.txt" || fail "help $c"
  case "$c" in
    create) args="--collection stray --dim 4" ;;
    drop | landmarks) args="--collection default" ;;
    upsert) args="--collection default --random 1" ;;
    delete) args="--collection default --ids 1" ;;
    mine) args="--collection default --random-queries 1" ;;
    drift) args="--collection default --model-step 1 --simulate" ;;
    batches) args="--queries $tmp/q.npy --positives $tmp/q.npy --out $tmp/stray.npy" ;;
    generate) args="--dim 4 --targets 1 --out $tmp/stray.npy" ;;
    *) args= ;;
  esac
  set +e
  # shellcheck disable=SC2086
  err=$(nm "$c" $args --no-such-option 1 2>&1 >/dev/null); rc=$?
  set -e
  [ "$rc" = 2 ] || fail "exit code $rc for '$c --no-such-option': $err"
  echo "$err" | grep -qF "unknown option --no-such-option for '$c'" || fail "$c: $err"
done
nm info --collection default | grep -q "targets=2000" || fail "a refused command wrote"
nm info --collection stray >/dev/null 2>&1 && fail "a refused create made a collection"
[ -e "$tmp/stray.npy" ] && fail "a refused command wrote a file"
# Sampling needs a temperature (the proto requires one): no silent default.
set +e
err=$(nm mine --collection default --queries "$tmp/q.npy" --k 4 --mode sample 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for --mode sample without --temperature"
echo "$err" | grep -q -- "--temperature T is required with --mode sample" || fail "message: $err"
# --json and --out together: both.
nm mine --collection default --queries "$tmp/q.npy" --k 5 --json --out "$tmp/both.npy" \
  > "$tmp/both.json" 2>/dev/null
cmp -s "$tmp/both.json" "$tmp/out.json" || fail "--json with --out: not the same JSON"
cmp -s "$tmp/both.npy" "$tmp/r.npy" || fail "--json with --out: not the same ids"

# Waiting. A stand-in server answers ListCollections UNAVAILABLE three
# times ("starting"), then an empty list: the client's retry policy (the
# channel's service config) gets through it, one attempt per answer. It
# answers GetIndexInfo UNAVAILABLE always: the policy gives up after its 5
# attempts with the server's status.
/usr/bin/python3 - "$tmp" <<'PY' &
import sys, grpc
from concurrent import futures
tmp = sys.argv[1]
calls = []
def list_collections(request, context):
    calls.append(1)
    open(tmp + "/fake_calls", "w").write(str(len(calls)))
    if len(calls) <= 3:
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting")
    return b""  # an empty ListCollectionsResponse
info_calls = []
def get_index_info(request, context):
    info_calls.append(1)
    open(tmp + "/fake_info_calls", "w").write(str(len(info_calls)))
    context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting")
handler = grpc.method_handlers_generic_handler("negmine.v1.NegativeMiner", {
    "ListCollections": grpc.unary_unary_rpc_method_handler(list_collections),
    "GetIndexInfo": grpc.unary_unary_rpc_method_handler(get_index_info)})
server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
open(tmp + "/fake_port.tmp", "w").write(str(port))
import os; os.rename(tmp + "/fake_port.tmp", tmp + "/fake_port")
server.wait_for_termination(timeout=120)
PY
fake=$!
for _ in $(seq 600); do [ -s "$tmp/fake_port" ] && break; sleep 0.05; done
"$cli" --server "127.0.0.1:$(cat "$tmp/fake_port")" list > "$tmp/fake_out" 2>&1 \
  || fail "no retry through UNAVAILABLE: $(cat "$tmp/fake_out")"
grep -q "no collections" "$tmp/fake_out" || fail "list: $(cat "$tmp/fake_out")"
[ "$(cat "$tmp/fake_calls")" = 4 ] || fail "$(cat "$tmp/fake_calls") attempts, not 4"
set +e
err=$("$cli" --server "127.0.0.1:$(cat "$tmp/fake_port")" info --collection c 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 1 ] || fail "exit code $rc when the server stays UNAVAILABLE"
echo "$err" | grep -q "UNAVAILABLE: GetIndexInfo: the server is starting" || fail "message: $err"
[ "$(cat "$tmp/fake_info_calls")" = 5 ] || fail "$(cat "$tmp/fake_info_calls") attempts, not 5"
kill "$fake"; wait "$fake" 2>/dev/null || true
# health --wait: started before the server listens, it waits through the
# refused connection and the recovery, and says SERVING; with nothing to
# wait for, it gives up at its deadline with exit code 1.
wport=$(/usr/bin/python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$cli" --server "127.0.0.1:$wport" health --wait 120 > "$tmp/wait_out" 2>&1 &
waiter=$!
"$server_bin" --listen="127.0.0.1:$wport" --data_dir="$tmp/data3" --metrics_listen= \
  --log_level=warning --default_dim=16 --generate_targets=20000 &
pid2=$!
wait "$waiter" || fail "health --wait: $(cat "$tmp/wait_out")"
grep -q "^SERVING$" "$tmp/wait_out" || fail "health --wait: $(cat "$tmp/wait_out")"
"$cli" --server "127.0.0.1:$wport" info --collection default | grep -q "targets=20000" \
  || fail "not SERVING after health --wait"
kill "$pid2"; wait "$pid2" 2>/dev/null || true
set +e
err=$("$cli" --server "127.0.0.1:$wport" health --wait 1 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 1 ] || fail "exit code $rc for health --wait with no server"
echo "$err" | grep -q "DEADLINE_EXCEEDED: the server was not SERVING within 1 s" || fail "message: $err"

# Progress: on a terminal (stderr a pty), a progress line for bulk upserts,
# drift updates, batch assignment and mines of several requests; piped,
# nothing.
nm create --collection prog --dim 16 >/dev/null
/usr/bin/python3 - "$cli" "127.0.0.1:$(cat "$tmp/port")" "$tmp" <<'PY' || fail "progress"
import os, pty, subprocess, sys
cli, server, tmp = sys.argv[1:4]
def run(args, tty):
    cmd = [cli, "--server", server] + args
    if not tty:
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.returncode == 0, (args, p.stderr)
        return p.stderr.decode()
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not b:
            break
        chunks.append(b)
    os.close(master)
    assert p.wait() == 0, (args, chunks)
    return b"".join(chunks).decode()
cases = [
    (["upsert", "--collection", "prog", "--random", "20000", "--seed", "2"],
     ["upsert 'prog' [", "100% 20000/20000 targets sent"]),
    (["drift", "--collection", "prog", "--model-step", "1", "--simulate", "--seed", "2"],
     ["drift update of 'prog'", " s"]),
    (["mine", "--collection", "default", "--queries", tmp + "/q3000.npy", "--k", "4",
      "--queries-per-request", "500", "--out", tmp + "/pm.npy"],
     ["mine 'default' [", "100% 3000/3000 queries"]),
    (["batches", "--queries", tmp + "/bx.npy", "--positives", tmp + "/by.npy",
      "--batch-size", "64", "--out", tmp + "/pb.npy"],
     ["batches: upload [", "100% 2000/2000 examples sent", "batches: job ", "100%"]),
]
for args, want in cases:
    shown = run(args, tty=True)
    for w in want:
        assert w in shown, (args, w, shown)
    assert "\r" in shown, shown
    piped = run(args, tty=False)
    assert "\r" not in piped and "%" not in piped, (args, piped)
PY

# Bad input: exit code 2 and a message naming the field and value.
set +e
err=$(nm mine --collection default --queries "$tmp/q.npy" --k 0 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for k = 0"
echo "$err" | grep -q "params.k = 0" || fail "message: $err"
set +e
err=$(nm mine --collection nope --queries "$tmp/q.npy" --k 3 2>&1 >/dev/null); rc=$?
set -e
[ "$rc" = 1 ] || fail "exit code $rc for an unknown collection"
echo "$err" | grep -q "NOT_FOUND" || fail "message: $err"
# A periodic snapshot appears (the log is not empty).
for _ in $(seq 100); do ls "$tmp"/data/snapshot-*.snap >/dev/null 2>&1 && break; sleep 0.1; done
ls "$tmp"/data/snapshot-*.snap >/dev/null 2>&1 || fail "no periodic snapshot"
echo "cli_test: all passed"
