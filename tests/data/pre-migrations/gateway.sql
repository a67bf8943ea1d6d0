-- The gateway database as release 52bf93e (before migrations) left it, dumped with sqlite3's iterdump.
BEGIN TRANSACTION;
CREATE TABLE api_keys (
	id VARCHAR(32) NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	hint VARCHAR(16) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	models JSON, 
	rpm INTEGER, 
	max_concurrency INTEGER, 
	is_admin BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	revoked_at DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO "api_keys" VALUES('key_67752fd5acc1dadf5e98eefb','2e80955bee87f46fc7f48e09141908111ed40eefc6b1bddc2c88a8129e50c510','aaaa','alice','laptop','["crucible-dev"]',60,NULL,0,'2026-11-30 16:31:07.411261',NULL);
INSERT INTO "api_keys" VALUES('key_d78fc76cde05db1cd620ef52','c41191db1d2ffc91f55307d577238a7beb08d7b5175f5773fec77e90f3a6411c','bbbb','ops','admin','null',NULL,NULL,1,'2026-11-30 16:31:07.413907',NULL);
INSERT INTO "api_keys" VALUES('key_ca05528da2d340e9b5296a7e','58e3981f9960c3c74d82b86accb234f9e5e4edc806287a0191ae75a723505428','cccc','bob','old','null',NULL,NULL,0,'2026-11-30 16:31:07.414493','2026-11-30 16:31:07.416480');
CREATE UNIQUE INDEX ix_api_keys_key_hash ON api_keys (key_hash);
CREATE INDEX ix_api_keys_owner ON api_keys (owner);
COMMIT;
