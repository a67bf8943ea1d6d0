-- The retrieval database as release 52bf93e (before migrations) left it, dumped with sqlite3's iterdump.
BEGIN TRANSACTION;
CREATE TABLE files (
	id VARCHAR(40) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	filename VARCHAR(255) NOT NULL, 
	purpose VARCHAR(32) NOT NULL, 
	bytes INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	created_at INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "files" VALUES('file-111111111111111111111111','alice','reactions.txt','assistants',1234,'abababababababababababababababababababababababababababababababab',1796056267);
CREATE TABLE vector_store_files (
	vector_store_id VARCHAR(40) NOT NULL, 
	file_id VARCHAR(40) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	last_error JSON, 
	attributes JSON NOT NULL, 
	chunking JSON NOT NULL, 
	chunk_count INTEGER NOT NULL, 
	usage_bytes INTEGER NOT NULL, 
	created_at INTEGER NOT NULL, 
	PRIMARY KEY (vector_store_id, file_id), 
	FOREIGN KEY(vector_store_id) REFERENCES vector_stores (id) ON DELETE CASCADE, 
	FOREIGN KEY(file_id) REFERENCES files (id) ON DELETE CASCADE
);
INSERT INTO "vector_store_files" VALUES('vs_04a8211d4437d91568a1bee4','file-111111111111111111111111','alice','completed',NULL,'{"year": 2026}','{"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}',3,1234,1796056267);
CREATE TABLE vector_stores (
	id VARCHAR(40) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	name VARCHAR(256), 
	metadata JSON NOT NULL, 
	expires_after JSON, 
	created_at INTEGER NOT NULL, 
	last_active_at INTEGER NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "vector_stores" VALUES('vs_04a8211d4437d91568a1bee4','alice','chemistry','{"team": "synthesis"}','null',1796056267,1796056267);
CREATE INDEX ix_files_created_at ON files (created_at);
CREATE INDEX ix_files_owner ON files (owner);
CREATE INDEX ix_vector_stores_owner ON vector_stores (owner);
CREATE INDEX ix_vector_stores_created_at ON vector_stores (created_at);
CREATE INDEX ix_vector_store_files_status ON vector_store_files (status);
CREATE INDEX ix_vector_store_files_created_at ON vector_store_files (created_at);
CREATE INDEX ix_vector_store_files_owner ON vector_store_files (owner);
COMMIT;
