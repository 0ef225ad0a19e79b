"""Use cases on top of the database and the store. Functions take ``session`` (and ``store``) as
arguments and never commit: the caller (request, task, CLI command) owns the transaction."""
