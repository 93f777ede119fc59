-- Whether a job also copies what refers to the image (signatures, attestations, SBOMs): on unless
-- the request turned it off.
alter table job add column referrers integer not null default 1;
