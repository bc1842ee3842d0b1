"""The Ray layer, wrapping the plain core (raysoup.search, raysoup.methods, raysoup.evaluate):
the evaluator pool (evaluators), the Tune-backed search (tune_search), the code that runs in
the cluster's worker processes (workers), and the SoupDriver actor with joining Ray
(driver)."""
