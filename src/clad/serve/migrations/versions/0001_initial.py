"""The first schema: inspections, verdicts, ratings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("model_version", sa.Integer, nullable=False),
        sa.Column("source", sa.String(200)),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_format", sa.String(10), nullable=False),
        sa.Column("image_stored", sa.Boolean, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("score_normalized", sa.Float),
        sa.Column("threshold", sa.Float),
        sa.Column("decision", sa.String(10)),
        sa.Column("uncertain", sa.Boolean, nullable=False),
        sa.Column("explanation", sa.JSON, nullable=False),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("map_sha256", sa.String(64), nullable=False),
        sa.Column("map_min", sa.Float, nullable=False),
        sa.Column("map_max", sa.Float, nullable=False),
        sa.Column("heat_min", sa.Float),
        sa.Column("heat_max", sa.Float),
        sa.Column("verdict", sa.String(10)),
        sa.Column("defect_type", sa.String(100)),
        sa.Column("rating", sa.Integer),
        sa.Column("note", sa.Text),
        sa.Column("operator", sa.String(100)),
        sa.Column("verdict_created", sa.DateTime(timezone=True)),
        sa.Column("taught_in_version", sa.Integer),
    )
    op.create_index("ix_inspections_created", "inspections", ["created"])
    op.create_index("ix_inspections_image_sha256", "inspections", ["image_sha256"])
    op.create_index("ix_inspections_map_sha256", "inspections", ["map_sha256"])
    op.create_index("ix_inspections_model_created", "inspections", ["model", "created"])
    op.create_index("ix_inspections_verdict", "inspections", ["verdict"])
    op.create_index("ix_inspections_decision", "inspections", ["decision"])

    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verdict", sa.String(10), nullable=False),
        sa.Column("defect_type", sa.String(100)),
        sa.Column("rating", sa.Integer),
        sa.Column("note", sa.Text),
        sa.Column("operator", sa.String(100)),
    )
    op.create_index("ix_verdicts_inspection_id", "verdicts", ["inspection_id"])

    op.create_table(
        "ratings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("inspection_id", sa.Integer, sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rater", sa.String(100), nullable=False),
        sa.Column("option", sa.String(2), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("inspection_id", "rater", "option", name="uq_ratings_option"),
    )
    op.create_index("ix_ratings_inspection_id", "ratings", ["inspection_id"])


def downgrade() -> None:
    op.drop_table("ratings")
    op.drop_table("verdicts")
    op.drop_table("inspections")
