-- Rate limits and the automatic response to misbehaving clients, changed through the admin API
-- and picked up by every broker within seconds (they poll this row).
CREATE TABLE security_settings (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    -- Canonical JSON of the settings (see api::limits::SecuritySettings).
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Sources refused outright: a locked-down client's addresses, or an officer's block. `until`
-- NULL means until an officer lifts it.
CREATE TABLE blocked_sources (
    cidr       text        NOT NULL,
    reason     text        NOT NULL,
    client_id  uuid,
    until      timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blocked_sources_cidr ON blocked_sources (cidr);
