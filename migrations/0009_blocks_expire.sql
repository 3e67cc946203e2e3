-- A lockdown no longer blocks addresses for good: every block ends by itself (an officer may
-- lift it sooner). Blocks made before this had no end; they end an hour from now.
UPDATE blocked_sources SET until = now() + interval '1 hour' WHERE until IS NULL;
ALTER TABLE blocked_sources ALTER COLUMN until SET NOT NULL;
