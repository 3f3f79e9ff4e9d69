"""Human side-by-side preferences and production feedback.

* :mod:`troupe.feedback.store`   the SQLAlchemy store: comparison items, labels, production events
* :mod:`troupe.feedback.app`     the Gradio labelling page (``troupe feedback label``)
* :mod:`troupe.feedback.export`  labels -> DPO pairs, HumanLabel records, inter-annotator agreement
* :mod:`troupe.feedback.cli`     ``troupe feedback queue | label | export | status``

``POST /v1/feedback`` (:mod:`serving.app`) writes production thumbs up/down into the same store.
"""
