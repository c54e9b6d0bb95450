"""Code that travels with a job (``submit --code DIR``): a content-addressed snapshot taken at
submit (:mod:`.snapshot`, with git's ignore rules from :mod:`.ignores`, kept in the state dir by
:mod:`.store`), described by a manifest (:mod:`.manifest`), and sent at dispatch (:mod:`.upload`)
into a per-user cache on the host, from which the job's own tree is built (:mod:`.host`)."""
