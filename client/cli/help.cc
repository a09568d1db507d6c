#include "client/cli/help.h"

#include "absl/strings/str_cat.h"

namespace negmine::client::cli {
namespace {

constexpr char kHeader[] = R"(negmine: the negmine command-line client

usage: negmine [global options] COMMAND [options]
       negmine help [COMMAND]      (or negmine COMMAND --help)
       negmine --version

global options:
  --server HOST:PORT   the negmine-server to talk to (default $NEGMINE_SERVER,
                       else 127.0.0.1:50051)
  --tls-ca CA.pem      use TLS, trusting this CA for the server's certificate
                       (default: plaintext)
  --tls-cert C.pem --tls-key K.pem
                       mTLS: this client's certificate and key (default: none)
  --token-file T       send the bearer token in T (default $NEGMINE_TOKEN, else
                       none)
  Every unary call has a 600 s deadline. A call answered UNAVAILABLE (the
  server is starting or recovering) is retried with backoff, 5 attempts in
  all (the waits add up to at most 16.5 s); `negmine health --wait S` first
  waits longer. On a terminal, upserts, drift updates, batch assignment and
  mines of several requests show a progress line on stderr; piped, nothing.
)";

struct CommandHelp {
  const char* name;
  const char* text;
};

constexpr CommandHelp kCommands[] = {
    {"create", R"(  create   --collection C --dim D [options]
           Creates a collection (an index).
           --metric inner_product|cosine       default inner_product (what
                                               the API's METRIC_UNSPECIFIED
                                               means; ip is accepted too)
           --index tree|exact                  default tree
           --backend auto|cpu|cuda             default auto (CUDA when built
                                               and a GPU is visible)
           --device-dtype float32|float16|bfloat16
                                               default float32 (GPU storage)
           --leaf-size L                       default 64 (tree)
           --branching B                       default 16 (tree)
           --num-landmarks M                   default 4 x dim, at least 64
           --rebase-residual R                 default 0 (never re-base on
                                               residual)
           --rebase-every S                    default 0 (never re-base on
                                               steps)
           (--landmarks M is the old name of --num-landmarks.)
)"},
    {"list", R"(  list     Every collection with its size and version.
)"},
    {"drop", R"(  drop     --collection C
           Removes a collection.
)"},
    {"upsert", R"(  upsert   --collection C (--npy X.npy [--ids I.npy] | --fvecs X.fvecs |
                           --random N [--seed S])
           --model-step T                      default 0
           --id-offset O                       default 0
           --seed S                            default 1 (--random)
           Rows get ids O..O+n-1 unless --ids is given. I.npy holds one id
           per row: uint64 (any id up to 2^64-2), or int64 / int32 (a
           negative entry is refused). 2^64-1 is refused: it is the padding
           of the id arrays negmine writes. --random draws N drift-bench
           targets of the collection's dim.
)"},
    {"delete", R"(  delete   --collection C --ids 1,2,3 [--allow-missing]
           --allow-missing                     default off: an unknown id is
                                               NOT_FOUND and nothing is deleted
)"},
    {"mine", R"(  mine     --collection C (--queries Q.npy | --random-queries N [--seed S])
           --k K                               default 10
           --mode topk|sample|mixed            default topk
           --temperature T                     required for sample and mixed
                                               (T > 0; no default)
           --num-hard H                        default k/2 (mixed)
           --rank-offset R                     default 0
           --with-replacement                  default off (sampling)
           --sample-seed S                     default 0: a fresh random seed
           --sampler proposal|exact            default proposal
           --approximate [--beam-width W]      default exact top-k; W default
                                               0: the server's (256, 128 on
                                               a GPU)
           --log-z [--log-z-width W]           default off; W default 0.01
           --exclude E.npy                     default none
           --positives P.npy                   default none
           --min-score S, --max-score S        default off
           --absolute-margin M                 default off (needs positives)
           --relative-margin M                 default off (needs positives)
           --dedupe-cosine C                   default off; C in (0, 1]
           --distribution softmax|simans       default softmax (sample, mixed)
           --simans-a A                        default 0.5 (the server's)
           --simans-b B                        default 0
           --simans-candidates K               default 0: max(k, 100)
           --format table|json|jsonl|tevatron|st-ntuple|st-triplet
                                               default table
           --json                              the same as --format json
           --out R.npy                         default: none
           --queries-per-request N             default: as many as fit
           --seed S                            default 1 (--random-queries)
           --random-queries draws drift-bench queries; use the seed the
           targets were generated with (the server's --generate_seed).
           E.npy is an n x m integer array of ids to exclude per query:
           uint64 (every id, 2^63 and above too; 2^64-1 is padding) or
           int64 / int32 (negative entries are padding). P.npy, each
           query's positives, has the same form: they are excluded, scored
           (positive scores) and give s_pos, the query's lowest positive
           score, to the margins and SimANS. An unknown positive id fails
           the call (NOT_FOUND).
           Filters remove targets from every mode (top-k takes the best
           that are left, sampling and log Z are over them): --min-score
           and --max-score drop s < S and s > S; --absolute-margin M drops
           s > s_pos - M; --relative-margin M drops s > s_pos - |s_pos| M;
           --dedupe-cosine C drops a candidate whose cosine to a positive
           or to a negative already taken is >= C. --distribution simans
           draws with weights exp(-a (s - s_pos - b)^2) from the K best
           eligible targets (needs --positives).
           Formats (stdout, one line per record):
             table       the readable table (positive scores and the
                         shortfall, when there are any)
             json        per query: query, ids, scores, log_q, num_top,
                         index_version; log_z_lo and log_z_hi with --log-z
             jsonl       per query: query (its row), positive_ids,
                         positive_scores, ids, scores, log_q, num_top,
                         count, num_eligible, removed (the filter counts:
                         excluded, positives, max_score, min_score,
                         absolute_margin, relative_margin, rank_offset,
                         dedupe), shortfall, index_version
             tevatron    Tevatron's training JSONL: query_id (the row),
                         query "", positive_passages and negative_passages
                         as {docid, title "", text ""}; join the texts by
                         docid
             st-ntuple   sentence-transformers' n-tuple as ids: anchor (the
                         row), positive, negative_1 .. negative_k, one row
                         per (query, positive); a query with fewer than k
                         negatives is left out (stderr counts them)
             st-triplet  sentence-transformers' triplet as ids: anchor,
                         positive, negative, one row per (query, positive,
                         negative)
           tevatron, st-ntuple and st-triplet need --positives.
           --out writes ids (n x k uint64, missing entries 2^64-1)
           to R.npy, and R.scores.npy and R.log_q.npy (n x k float32) beside
           it; it may be given with any format (table: then nothing is
           printed).
           Any number of queries: one Mine call when they fit one request
           of N queries (by default as many as fit the server's max_batch
           and message limit, read from GetIndexInfo), else one MineStream
           of such requests, two in flight; the results come back in query
           order.
           --log-z also returns each query's certified log Z interval over
           its eligible targets (R.log_z.npy: n x 2 float64 [lo, hi]),
           tightened to W nats. It costs far more than the draws.
)"},
    {"landmarks", R"(  landmarks --collection C [--ids-out L.npy] [--json]
           The ids to re-encode for the next drift update, and their
           landmark epoch (pass it to drift --epoch). --ids-out writes the
           ids (m x 1 uint64) to L.npy; --json prints {"landmark_epoch": E,
           "num_landmarks": m, "ids": [...]} instead of the summary line.
           (--out is the old name of --ids-out.)
)"},
    {"drift", R"(  drift    --collection C --model-step T
           (--landmark-embeddings G.npy --epoch E |
            --linear-a A.npy [--linear-b B.npy] | --simulate [--seed S])
           --seed S                            default 1 (--simulate)
           Applies a drift update: G.npy holds the landmarks' embeddings
           re-encoded at step T (m x dim float, in the order of landmarks
           --ids-out); A.npy (dim x dim) and B.npy (1 x dim) an exact linear
           map new = A old + b. --simulate re-encodes the landmarks with the
           drift-bench encoder at step T, for collections of drift-bench
           targets whose ids are their rows (--random, or the server's
           --generate_targets).
           (--landmarks G.npy is the old name of --landmark-embeddings.)
)"},
    {"batches", R"(  batches  --queries X.npy --positives Y.npy --batch-size B --out batches.npy
           --neighbors K                       default 0: the server's (16)
           --quantile Q                        default 0: off
           --seed S                            default 1
           --keep-batch-order                  default off: batches shuffled
           --sync                              default off: a job
           Global contrastive batch sampling: orders the N training examples
           (row i of X and of Y) so that each batch holds hard negatives of
           each other. Writes the batches as a (num batches x B) uint64
           array of example rows (a short last batch padded with 2^64-1).
           Runs as a server job (AssignBatches async, polled with
           GetBatchJob), whatever the size; --sync waits on one call instead,
           which the server refuses above its --max_sync_batch_examples.
           (--async, the old switch for a job, is accepted and changes
           nothing.)
)"},
    {"snapshot", R"(  snapshot
           Writes a snapshot of every collection now (they are also taken
           periodically); recovery then replays only the log after it.
)"},
    {"health", R"(  health   [--timeout-seconds T] [--wait SECONDS]
           --timeout-seconds T                 default 5
           --wait SECONDS                      default 0: ask once
           grpc.health.v1 Check: exit 0 when the server is SERVING, 1 when
           it is not (or unreachable). For container health checks.
           --wait waits up to SECONDS for SERVING (Health/Watch): through a
           server not listening yet and through its recovery.
)"},
    {"info", R"(  info     [--collection C]
           One collection in detail (tree, drift, the server's limits), or
           every collection in one line each.
)"},
    {"generate", R"(  generate (--targets N | --queries N) --dim D --out X.npy [--seed S]
           --seed S                            default 1
           Writes drift-bench vectors (step 0) to an .npy file; needs no
           server.
)"},
};

constexpr char kFooter[] = R"(
.npy inputs: vectors are float32, float16 or float64 (converted to float32),
1-D or 2-D, C order; ids are uint64, uint32, int64 or int32. .fvecs is, per
vector, an int32 dim then dim float32. Exit codes: 0 ok, 2 bad input, 1 any
other error.
)";

}  // namespace

std::string Usage() {
  std::string s = kHeader;
  s += "\ncommands:\n";
  for (const CommandHelp& c : kCommands) s += c.text;
  s += "  help [COMMAND]\n";
  return s + kFooter;
}

std::string CommandUsage(const std::string& name) {
  for (const CommandHelp& c : kCommands) {
    if (name == c.name) return absl::StrCat("usage: negmine [global options] ", name,
                                            " ...\n\n", c.text, kFooter);
  }
  return "";
}

}  // namespace negmine::client::cli
