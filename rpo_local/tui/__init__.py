"""`rpo chat`: a Textual terminal chat client over the personalization pipeline.

Importing this package imports Textual; the CLI does so only inside the `chat` verb.
"""
