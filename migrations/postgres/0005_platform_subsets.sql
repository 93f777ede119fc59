-- Platform subsets (as migrations/0007 for SQLite): a request may name some platforms of an index;
-- only those children are copied, each under its official digest.

-- The platforms asked for (a JSON array of `os/arch[/variant]`, sorted, no repeats); null for the
-- whole image. A different set is a different request.
alter table job add column platforms jsonb;

-- What a subset copied: {"platforms": [...], "children": [{"platform", "digest", "attestations"}]};
-- null when the whole image was copied. `source_digest` is then the source index (never pushed)
-- and `mirror_digest` the one child or the index rebuilt from the children (not official). The
-- children's digests are in record_manifest like every other digest the record names.
alter table mirror_record add column subset jsonb;
