"""Every component id of the app, as a named constant (pages and callbacks import these).

Ids of the shared shell (stores, navigation) have no prefix; page ids start with the page's
short name. Each page that runs background jobs gets a :class:`JobIds` group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobIds:
    """The ids of one page's job panel.

    ``store`` holds the running job's id; ``interval`` polls it; ``progress``/``status`` show
    it; ``cancel`` asks it to stop; ``done`` receives the final status once, for the page's
    own callback to pick the result up.
    """

    store: str
    interval: str
    progress: str
    cancel: str
    status: str
    done: str

    @classmethod
    def for_page(cls, page: str) -> "JobIds":
        return cls(*(f"{page}-job-{part}" for part in ("store", "interval", "progress", "cancel", "status", "done")))


# ---------------------------------------------------------------- shell (app layout)
URL = "url"
SESSION = "session-store"            # per browser session: model, analysis key, selected head, prompt
INTERVENTIONS = "interventions-store"  # per browser session: list of active head interventions
NAV = "nav"
SESSION_BADGE = "session-badge"      # model / prompt summary shown in the header
SHARE_MESSAGE = "share-message"      # why a shared address (?prompt=&head=&metric=) could not be used
SHARE_NOTE = "share-note"            # Store (memory): the session that message was about
SHARE_ADOPTED = "share-adopted"      # Store (memory): bumped when an address's prompt is adopted (pages re-init)
SHARE_READ = "share-read"            # Store (memory): the last query read back (the address is written after it)

# ---------------------------------------------------------------- page 1: model & prompt
PROMPT_MODEL = "prompt-model"
PROMPT_FOLDER = "prompt-folder"
PROMPT_TEXT = "prompt-text"
PROMPT_DATASET = "prompt-dataset"
PROMPT_EXAMPLE = "prompt-example"
PROMPT_LOAD_EXAMPLE = "prompt-load-example"
PROMPT_RUN = "prompt-run"
PROMPT_MESSAGE = "prompt-message"
PROMPT_TOKENS = "prompt-tokens"
PROMPT_SUMMARY = "prompt-summary"
PROMPT_INIT = "prompt-init"             # Store in the page: fires once when the page renders
PROMPT_EXAMPLE_ERROR = "prompt-example-error"
PROMPT_JOB = JobIds.for_page("prompt")

# ---------------------------------------------------------------- page 2: head map
HEADMAP_METRIC = "headmap-metric"
HEADMAP_GRAPH = "headmap-graph"
HEADMAP_HELP = "headmap-help"
HEADMAP_MESSAGE = "headmap-message"
HEADMAP_PROBE = "headmap-probe"
HEADMAP_SOURCE = "headmap-source"       # compute a probe on this prompt or on a dataset
HEADMAP_SOURCE_N = "headmap-source-n"
HEADMAP_COMPUTE = "headmap-compute"
HEADMAP_PROBE_LIST = "headmap-probe-list"
HEADMAP_SELECTED = "headmap-selected"
HEADMAP_REFRESH = "headmap-refresh"   # Store bumped when an on-demand probe finishes
HEADMAP_SOURCE_N_ERROR = "headmap-source-n-error"
HEADMAP_LINKS = "headmap-links"
HEADMAP_JOB = JobIds.for_page("headmap")

# ---------------------------------------------------------------- page 3: pattern viewer
PATTERN_LAYER = "pattern-layer"
PATTERN_HEAD = "pattern-head"
PATTERN_GRAPH = "pattern-graph"
PATTERN_QUERY = "pattern-query"
PATTERN_ROW = "pattern-row"
PATTERN_MESSAGE = "pattern-message"
PATTERN_INFO = "pattern-info"
PATTERN_INIT = "pattern-init"
PATTERN_VIEW = "pattern-view"         # Store: the region shown (for zoom events)
PATTERN_REGION = "pattern-region"     # Store: the region a zoom asked for ({layer, head, region})
PATTERN_OPTIONS = "pattern-options"   # Checklist: log scale, hide BOS
PATTERN_QUERY_ERROR = "pattern-query-error"
PATTERN_ROW_RANGE = "pattern-row-range"  # Store: the key range a zoom on the row view asked for
PATTERN_TOPK = "pattern-topk"         # the row's strongest keys
PATTERN_LINKS = "pattern-links"

# ---------------------------------------------------------------- page 4: head atlas
ATLAS_DATASET = "atlas-dataset"
ATLAS_N = "atlas-n"
ATLAS_METHOD = "atlas-method"
ATLAS_COLOR = "atlas-color"
ATLAS_THRESHOLD = "atlas-threshold"
ATLAS_RUN = "atlas-run"
ATLAS_GRAPH = "atlas-graph"
ATLAS_MESSAGE = "atlas-message"
ATLAS_RESULT = "atlas-result"         # Store: key of the finished embedding
ATLAS_N_ERROR = "atlas-n-error"
ATLAS_JOB = JobIds.for_page("atlas")

# ---------------------------------------------------------------- page 5: intervene
INTERVENE_LAYER = "intervene-layer"
INTERVENE_HEAD = "intervene-head"
INTERVENE_KIND = "intervene-kind"
INTERVENE_ALPHA = "intervene-alpha"
INTERVENE_U = "intervene-u"
INTERVENE_ADD = "intervene-add"
INTERVENE_CLEAR = "intervene-clear"
INTERVENE_LIST = "intervene-list"
INTERVENE_REMOVE = "intervene-remove"  # pattern-matching type: {"type": INTERVENE_REMOVE, "index": i}
INTERVENE_RUN = "intervene-run"
INTERVENE_METRIC = "intervene-metric"
INTERVENE_TOPK = "intervene-topk"
INTERVENE_LOSS = "intervene-loss"
INTERVENE_CONTINUATION = "intervene-continuation"
INTERVENE_DELTA = "intervene-delta"
INTERVENE_MESSAGE = "intervene-message"
INTERVENE_INIT = "intervene-init"
INTERVENE_RESULT = "intervene-result"  # Store: key of the finished comparison
INTERVENE_FOLLOWUP = "intervene-followup"  # Store: key of the comparison whose follow-up finished
INTERVENE_ALPHA_BOX = "intervene-alpha-box"
INTERVENE_U_BOX = "intervene-u-box"
INTERVENE_ALPHA_ERROR = "intervene-alpha-error"
INTERVENE_U_ERROR = "intervene-u-error"
INTERVENE_TARGET_TEXT = "intervene-target-text"
INTERVENE_DISTRACTOR = "intervene-distractor"
INTERVENE_TARGET = "intervene-target"   # the target-token table
INTERVENE_STALE = "intervene-stale"     # says when the shown results belong to another prompt or list
INTERVENE_JOB = JobIds.for_page("intervene")

# ---------------------------------------------------------------- page 6: runs
RUNS_PATH = "runs-path"
RUNS_PICK = "runs-pick"
RUNS_COMPARE_PATH = "runs-compare-path"
RUNS_COMPARE_PICK = "runs-compare-pick"
RUNS_OPEN = "runs-open"
RUNS_METRIC = "runs-metric"
RUNS_MANIFEST = "runs-manifest"
RUNS_GRAPH = "runs-graph"
RUNS_DELTA = "runs-delta"
RUNS_TABLE = "runs-table"
RUNS_MESSAGE = "runs-message"
RUNS_INIT = "runs-init"
RUNS_STATE = "runs-state"             # Store: the opened folder paths
RUNS_WARNING = "runs-warning"         # the two runs differ in model / dataset / lengths
RUNS_ROOT = "runs-root"

# ---------------------------------------------------------------- page 7: long context
LC_LENGTH = "lc-length"
LC_DEPTHS = "lc-depths"
LC_RUN = "lc-run"
LC_GRAPH = "lc-graph"
LC_MESSAGE = "lc-message"
LC_RESULT = "lc-result"               # Store: key of the finished long-context run
LC_HEAD = "lc-head"                   # Store: the clicked [layer, head]
LC_SAMPLE = "lc-sample"               # which needle sample the head view shows
LC_THUMB = "lc-thumb"
LC_ROW = "lc-row"
LC_JOB = JobIds.for_page("lc")

# ---------------------------------------------------------------- head card (on pages where a head is selected)
HEADCARD = "headcard"                  # the card's container
HEADCARD_TARGET = "headcard-target"    # typed target token
HEADCARD_BODY = "headcard-body"

# ---------------------------------------------------------------- page: activation patching
PATCH_CLEAN = "patch-clean"
PATCH_CORRUPT = "patch-corrupt"
PATCH_ANSWER = "patch-answer"
PATCH_DISTRACTOR = "patch-distractor"
PATCH_METRIC = "patch-metric"
PATCH_EXAMPLE = "patch-example"
PATCH_RUN = "patch-run"
PATCH_MESSAGE = "patch-message"
PATCH_RESULT = "patch-result"          # Store: key of the finished patching result
PATCH_HEADS_GRAPH = "patch-heads-graph"
PATCH_RESID_GRAPH = "patch-resid-graph"
PATCH_SUMMARY = "patch-summary"
PATCH_JOB = JobIds.for_page("patch")
