-- Customer tokens (see src/access/tokens.rs) are signed with a random secret of the key that
-- minted them, stored here on the key's first mint (NULL until then). Revoking the key
-- revokes its tokens; the secret never leaves the server.
ALTER TABLE api_keys
    ADD COLUMN token_secret bytea CHECK (token_secret IS NULL OR length(token_secret) = 32);
