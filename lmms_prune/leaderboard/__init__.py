"""Leaderboard submissions: result bundles (``bundle``), their verification against the per-sample logs
(``verify``) and the static leaderboard page (``page``). See docs/leaderboard.md."""
