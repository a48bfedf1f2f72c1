"""Human labeling: a web page where people compare two answers and mark each safe or unsafe.

`store` keeps annotators, batches, impressions and labels in SQLite and exports PREFERENCES
Parquet; `app` serves the page and its JSON API (`alignflow label serve`).
"""
