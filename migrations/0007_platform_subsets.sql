-- Platform subsets: a request may name some platforms of an index; only those children are copied,
-- each under its official digest.

-- The platforms asked for, as a JSON array of `os/arch[/variant]` sorted without repeats; null for
-- the whole image. A different set is a different request (dedupe never joins across sets).
alter table job add column platforms text;

-- What a subset copied, as JSON {"platforms": [...], "children": [{"platform", "digest",
-- "attestations"}]}; null when the whole image was copied. `source_digest` is then the source
-- index (never pushed to the target) and `mirror_digest` the one child (one platform: its official
-- digest) or the index rebuilt from the children (several: not an official digest).
alter table mirror_record add column subset text;
