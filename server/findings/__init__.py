"""Step 4 → findings: what the server concludes each round from what it saw, each with the sentence that justifies it.

One rule and its thresholds per function, one module per kind of evidence:

- direct.py      observed in the round: a site failed, refused, sent an unusable update; the model collapsed; DP noise
                 drowns the updates
- cross_site.py  cross-site departures: an update of norm 0, a step size read off the DP noise many times the
                 others', a straggler round after round
- trends.py      the global model's curves over rounds: underfitting, global overfitting, miscalibration
- evidence.py    statistical diagnosis across sites and rounds (which site has noisy labels, a missing class, ...):
                 each site's released summaries accumulated over rounds, read by agreement.py, labels.py, loss.py,
                 schedule.py and probe.py
- tracker.py     FindingsTracker merges them all and records a finding in the round it appears; Diagnosis runs the
                 statistical tests in order (and withholds some under label skew); rediagnose replays stored rounds

The engine reads typed rounds (common/rounds.py) and never the run store: `fedlens diagnose` (fedlens/diagnose.py)
loads a stored run and hands its rounds to rediagnose.
"""

from server.findings.cross_site import MIN_SITES, NORM_OUTLIER, STEP_OUTLIER, STRAGGLER, STRAGGLER_MIN_S, ZERO_NORM
from server.findings.direct import COLLAPSE_SHARE, NOISE_DOMINATED
from server.findings.tracker import Diagnosis, FindingsTracker, current, rediagnose
from server.findings.trends import MISCAL_GAP, MISCAL_ROUNDS, OVERFIT_RISE, TREND_ROUNDS, UNDERFIT_DROP, trends

__all__ = [
    "COLLAPSE_SHARE", "MIN_SITES", "MISCAL_GAP", "MISCAL_ROUNDS", "NOISE_DOMINATED", "NORM_OUTLIER", "OVERFIT_RISE",
    "STEP_OUTLIER", "STRAGGLER", "STRAGGLER_MIN_S", "TREND_ROUNDS", "UNDERFIT_DROP", "ZERO_NORM",
    "Diagnosis", "FindingsTracker", "current", "rediagnose", "trends",
]
