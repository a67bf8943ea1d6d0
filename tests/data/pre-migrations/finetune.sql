-- The finetune database as release 52bf93e (before migrations) left it, dumped with sqlite3's iterdump.
BEGIN TRANSACTION;
CREATE TABLE adapters (
	model VARCHAR(256) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	base_model VARCHAR(256) NOT NULL, 
	path VARCHAR(1024) NOT NULL, 
	created_at INTEGER NOT NULL, 
	PRIMARY KEY (model)
);
INSERT INTO "adapters" VALUES('ft:crucible-dev:chem:ftjob-222222222222222222222222','alice','ftjob-222222222222222222222222','crucible-dev','/var/adapters/ftjob-222222222222222222222222',1796056267);
CREATE TABLE fine_tuning_checkpoints (
	id VARCHAR(40) NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	step INTEGER NOT NULL, 
	metrics JSON NOT NULL, 
	created_at INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES fine_tuning_jobs (id)
);
INSERT INTO "fine_tuning_checkpoints" VALUES('ftckpt_712ea9548473a69d88aefec5','ftjob-222222222222222222222222',10,'{"train_loss": 1.23}',1796056267);
CREATE TABLE fine_tuning_events (
	id INTEGER NOT NULL, 
	job_id VARCHAR(40) NOT NULL, 
	created_at INTEGER NOT NULL, 
	level VARCHAR(8) NOT NULL, 
	type VARCHAR(16) NOT NULL, 
	message VARCHAR(2000) NOT NULL, 
	data JSON, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES fine_tuning_jobs (id)
);
INSERT INTO "fine_tuning_events" VALUES(1,'ftjob-222222222222222222222222',1796056267,'info','message','Created fine-tuning job: ftjob-222222222222222222222222','null');
INSERT INTO "fine_tuning_events" VALUES(2,'ftjob-222222222222222222222222',1796056267,'info','message','Job queued','null');
INSERT INTO "fine_tuning_events" VALUES(3,'ftjob-222222222222222222222222',1796056267,'info','message','Job running','null');
INSERT INTO "fine_tuning_events" VALUES(4,'ftjob-222222222222222222222222',1796056267,'info','metrics','Step 10/30: training loss=1.23','{"step": 10, "train_loss": 1.23}');
INSERT INTO "fine_tuning_events" VALUES(5,'ftjob-222222222222222222222222',1796056267,'info','message','Job succeeded','null');
CREATE TABLE fine_tuning_jobs (
	id VARCHAR(40) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	model VARCHAR(256) NOT NULL, 
	training_file VARCHAR(40) NOT NULL, 
	validation_file VARCHAR(40), 
	suffix VARCHAR(64), 
	seed INTEGER NOT NULL, 
	hyperparameters JSON NOT NULL, 
	lora JSON NOT NULL, 
	metadata JSON, 
	status VARCHAR(24) NOT NULL, 
	error JSON, 
	fine_tuned_model VARCHAR(256), 
	trained_tokens INTEGER, 
	created_at INTEGER NOT NULL, 
	queued_at FLOAT, 
	finished_at INTEGER, 
	attempts INTEGER NOT NULL, 
	heartbeat_at FLOAT, 
	worker VARCHAR(128), 
	cancel_requested BOOLEAN NOT NULL, 
	idempotency_key VARCHAR(256), 
	request_hash VARCHAR(64), 
	PRIMARY KEY (id), 
	UNIQUE (owner, idempotency_key)
);
INSERT INTO "fine_tuning_jobs" VALUES('ftjob-222222222222222222222222','alice','crucible-dev','file-111111111111111111111111',NULL,'chem',7,'{"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}','{"r": 8, "alpha": 16}','{"project": "p1"}','succeeded',NULL,'ft:crucible-dev:chem:ftjob-222222222222222222222222',4096,1796056267,1.79605626743846225742e+09,1796056267,0,NULL,NULL,0,NULL,NULL);
CREATE INDEX ix_fine_tuning_jobs_status ON fine_tuning_jobs (status);
CREATE INDEX ix_fine_tuning_jobs_owner ON fine_tuning_jobs (owner);
CREATE INDEX ix_fine_tuning_jobs_created_at ON fine_tuning_jobs (created_at);
CREATE INDEX ix_adapters_owner ON adapters (owner);
CREATE INDEX ix_fine_tuning_events_job_id ON fine_tuning_events (job_id);
CREATE INDEX ix_fine_tuning_checkpoints_created_at ON fine_tuning_checkpoints (created_at);
CREATE INDEX ix_fine_tuning_checkpoints_job_id ON fine_tuning_checkpoints (job_id);
COMMIT;
