-- Every broker keeps a node-local cache of what authentication reads (client state, scopes,
-- address policy, revoked tokens) and of the security settings and blocked sources. These
-- triggers tell every broker, through LISTEN/NOTIFY on channel `keybroker_auth`, the moment such a
-- row changes, whoever changed it (a broker, the CLI, an officer with psql). Postgres delivers a
-- notification when its transaction commits, and never one of a rolled-back change.
-- Payloads: `client:<uuid>`, `revoked:<jti>`, `settings`, `blocks`.

CREATE FUNCTION keybroker_notify_client() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('keybroker_auth', 'client:' || OLD.id::text);
    ELSE
        PERFORM pg_notify('keybroker_auth', 'client:' || NEW.id::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER clients_notify AFTER INSERT OR UPDATE OR DELETE ON clients
    FOR EACH ROW EXECUTE FUNCTION keybroker_notify_client();

CREATE FUNCTION keybroker_notify_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keybroker_auth', 'revoked:' || NEW.jti::text);
    RETURN NULL;
END $$;

-- Only insertions: a row is deleted once its token has expired anyway.
CREATE TRIGGER revoked_tokens_notify AFTER INSERT ON revoked_tokens
    FOR EACH ROW EXECUTE FUNCTION keybroker_notify_revoked();

CREATE FUNCTION keybroker_notify_table() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keybroker_auth', TG_ARGV[0]);
    RETURN NULL;
END $$;

CREATE TRIGGER security_settings_notify AFTER INSERT OR UPDATE OR DELETE ON security_settings
    FOR EACH STATEMENT EXECUTE FUNCTION keybroker_notify_table('settings');
CREATE TRIGGER blocked_sources_notify AFTER INSERT OR UPDATE OR DELETE ON blocked_sources
    FOR EACH STATEMENT EXECUTE FUNCTION keybroker_notify_table('blocks');
