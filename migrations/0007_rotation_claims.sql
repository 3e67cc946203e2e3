-- A scheduled rotation is claimed for a few minutes before it is done; the due date moves only
-- when the new version is stored. A broker that dies holding a claim leaves it to expire, and
-- the next pass does the rotation: exactly once, never skipped.
ALTER TABLE keys ADD COLUMN rotation_claimed_until timestamptz;
