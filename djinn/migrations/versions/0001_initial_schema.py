"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-28 08:19:04.150159
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('email', sa.String(length=255), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('namespaces',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('root_id', sa.Integer(), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('visibility', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['namespaces.id'], name=op.f('fk_namespaces_parent_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['root_id'], ['namespaces.id'], name=op.f('fk_namespaces_root_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_namespaces_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_namespaces')),
    sa.UniqueConstraint('user_id', 'path', name=op.f('uq_namespaces_user_id'))
    )
    op.create_table('builds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('namespace_id', sa.Integer(), nullable=True),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('manifest', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'passed', 'passed_with_failures', 'failed', 'killed', 'timed_out', name='build_status'), server_default='queued', nullable=False),
    sa.Column('output', sa.Text(), nullable=True),
    sa.Column('secret', sa.String(length=64), nullable=True),
    sa.Column('pinned', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['namespace_id'], ['namespaces.id'], name=op.f('fk_builds_namespace_id'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_builds_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_builds')),
    sa.UniqueConstraint('user_id', 'number', name=op.f('uq_builds_user_id'))
    )
    op.create_index('ix_builds_status', 'builds', ['status'], unique=False)
    op.create_table('namespace_collaborators',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('namespace_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['namespace_id'], ['namespaces.id'], name=op.f('fk_namespace_collaborators_namespace_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_namespace_collaborators_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_namespace_collaborators'))
    )
    op.create_table('objects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('namespace_id', sa.Integer(), nullable=True),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('md5', sa.LargeBinary(), nullable=True),
    sa.Column('sha256', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['namespace_id'], ['namespaces.id'], name=op.f('fk_objects_namespace_id'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_objects_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_objects')),
    sa.UniqueConstraint('user_id', 'name', name=op.f('uq_objects_user_id'))
    )
    op.create_table('build_drivers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('type', sa.Enum('docker', 'qemu', 'ssh', 'os', name='driver_type'), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_drivers_build_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_drivers')),
    sa.UniqueConstraint('build_id', name=op.f('uq_build_drivers_build_id'))
    )
    op.create_table('build_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('key_id', sa.Integer(), nullable=True),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('key', sa.LargeBinary(), nullable=False),
    sa.Column('config', sa.Text(), nullable=False),
    sa.Column('location', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_keys_build_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_keys'))
    )
    op.create_index(op.f('ix_build_keys_build_id'), 'build_keys', ['build_id'], unique=False)
    op.create_table('build_objects',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('object_id', sa.Integer(), nullable=True),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('placed', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_objects_build_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['object_id'], ['objects.id'], name=op.f('fk_build_objects_object_id'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_objects'))
    )
    op.create_index(op.f('ix_build_objects_build_id'), 'build_objects', ['build_id'], unique=False)
    op.create_table('build_stages',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('can_fail', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_stages_build_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_stages'))
    )
    op.create_index(op.f('ix_build_stages_build_id'), 'build_stages', ['build_id'], unique=False)
    op.create_table('build_tags',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_tags_build_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_build_tags_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_tags'))
    )
    op.create_index(op.f('ix_build_tags_build_id'), 'build_tags', ['build_id'], unique=False)
    op.create_table('build_triggers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('provider_id', sa.Integer(), nullable=True),
    sa.Column('repo_id', sa.Integer(), nullable=True),
    sa.Column('type', sa.Enum('manual', 'push', 'pull', 'schedule', name='trigger_type'), nullable=False),
    sa.Column('comment', sa.Text(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_triggers_build_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_triggers')),
    sa.UniqueConstraint('build_id', name=op.f('uq_build_triggers_build_id'))
    )
    op.create_table('build_variables',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('variable_id', sa.Integer(), nullable=True),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.Column('masked', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_variables_build_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_variables'))
    )
    op.create_index(op.f('ix_build_variables_build_id'), 'build_variables', ['build_id'], unique=False)
    op.create_table('build_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('stage_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('commands', sa.Text(), nullable=False),
    sa.Column('output', sa.Text(), nullable=True),
    sa.Column('status', sa.Enum('queued', 'running', 'passed', 'passed_with_failures', 'failed', 'killed', 'timed_out', name='build_status'), server_default='queued', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_jobs_build_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['stage_id'], ['build_stages.id'], name=op.f('fk_build_jobs_stage_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_jobs'))
    )
    op.create_index(op.f('ix_build_jobs_build_id'), 'build_jobs', ['build_id'], unique=False)
    op.create_table('build_artifacts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=True),
    sa.Column('md5', sa.LargeBinary(), nullable=True),
    sa.Column('sha256', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_artifacts_build_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['build_jobs.id'], name=op.f('fk_build_artifacts_job_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_build_artifacts_user_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_artifacts'))
    )
    op.create_index(op.f('ix_build_artifacts_build_id'), 'build_artifacts', ['build_id'], unique=False)
    op.create_table('build_job_output',
    sa.Column('id', sa.BigInteger(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], name=op.f('fk_build_job_output_build_id'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['build_jobs.id'], name=op.f('fk_build_job_output_job_id'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_build_job_output'))
    )
    op.create_index('ix_build_job_output_build_id_id', 'build_job_output', ['build_id', 'id'], unique=False)



def downgrade() -> None:

    op.drop_index('ix_build_job_output_build_id_id', table_name='build_job_output')
    op.drop_table('build_job_output')
    op.drop_index(op.f('ix_build_artifacts_build_id'), table_name='build_artifacts')
    op.drop_table('build_artifacts')
    op.drop_index(op.f('ix_build_jobs_build_id'), table_name='build_jobs')
    op.drop_table('build_jobs')
    op.drop_index(op.f('ix_build_variables_build_id'), table_name='build_variables')
    op.drop_table('build_variables')
    op.drop_table('build_triggers')
    op.drop_index(op.f('ix_build_tags_build_id'), table_name='build_tags')
    op.drop_table('build_tags')
    op.drop_index(op.f('ix_build_stages_build_id'), table_name='build_stages')
    op.drop_table('build_stages')
    op.drop_index(op.f('ix_build_objects_build_id'), table_name='build_objects')
    op.drop_table('build_objects')
    op.drop_index(op.f('ix_build_keys_build_id'), table_name='build_keys')
    op.drop_table('build_keys')
    op.drop_table('build_drivers')
    op.drop_table('objects')
    op.drop_table('namespace_collaborators')
    op.drop_index('ix_builds_status', table_name='builds')
    op.drop_table('builds')
    op.drop_table('namespaces')
    op.drop_table('users')

    for name in ("build_status", "driver_type", "trigger_type"):
        sa.Enum(name=name).drop(op.get_bind(), checkfirst=True)
