-- The agent database as release 52bf93e (before migrations) left it, dumped with sqlite3's iterdump.
-- Its agent_runs is as before commit 41cb9f6, which added tool_choice without a migration.
BEGIN TRANSACTION;
CREATE TABLE agent_runs (
	id VARCHAR(40) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	key_id VARCHAR(40) NOT NULL, 
	model VARCHAR(256) NOT NULL, 
	mode VARCHAR(16) NOT NULL, 
	instructions VARCHAR(20000) NOT NULL, 
	nonce VARCHAR(32) NOT NULL, 
	messages JSON NOT NULL, 
	tools JSON NOT NULL, 
	vector_store_ids JSON NOT NULL, 
	budgets JSON NOT NULL, 
	metadata JSON, 
	status VARCHAR(16) NOT NULL, 
	output JSON, 
	usage JSON NOT NULL, 
	timings JSON, 
	incomplete_details JSON, 
	error JSON, 
	cancel_requested BOOLEAN NOT NULL, 
	created_at INTEGER NOT NULL, 
	started_at FLOAT, 
	completed_at FLOAT, 
	PRIMARY KEY (id)
);
INSERT INTO "agent_runs" VALUES('run_333333333333333333333333','alice','key_67752fd5acc1dadf5e98eefb','crucible-dev','structured','Answer from the lab''s notes.','nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn','[{"role": "user", "content": "What is the MW of ethanol?"}]','["chemistry", "calculator"]','["vs_04a8211d4437d91568a1bee4"]','{"max_steps": 4}','{"k": "v"}','completed','{"text": "46.07 g/mol"}','{"total_tokens": 120}',NULL,NULL,NULL,0,1796056267,1.79605626745068931576e+09,1.79605626745275402068e+09);
CREATE TABLE agent_steps (
	id INTEGER NOT NULL, 
	run_id VARCHAR(40) NOT NULL, 
	"index" INTEGER NOT NULL, 
	data JSON NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES agent_runs (id)
);
INSERT INTO "agent_steps" VALUES(1,'run_333333333333333333333333',0,'{"index": 0, "type": "tool_call", "tool": "chemistry", "output": {"mw": 46.07}}');
CREATE INDEX ix_agent_runs_status ON agent_runs (status);
CREATE INDEX ix_agent_runs_created_at ON agent_runs (created_at);
CREATE INDEX ix_agent_runs_owner ON agent_runs (owner);
CREATE INDEX ix_agent_steps_run_id ON agent_steps (run_id);
COMMIT;
