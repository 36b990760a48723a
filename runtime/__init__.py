"""What changes while training: the PFQ loss-plateau indicator and scheduler, the cost meter.

Every object here follows the LR-scheduler protocol (step(), state_dict(), load_state_dict())
with plain-data state, so a resumed run continues exactly as an uninterrupted one.
Importing this package loads only torch and fracfx's leaf modules.
"""

from fracfx.runtime.cost import CostMeter, pfq_cost_fraction
from fracfx.runtime.dfq import DFQController, FracTrainScheduler
from fracfx.runtime.dfq_cost import DFQCostMeter
from fracfx.runtime.pfq import PFQScheduler
from fracfx.runtime.plateau import PlateauIndicator, PlateauTracker

__all__ = ["PlateauIndicator", "PlateauTracker", "PFQScheduler", "CostMeter", "pfq_cost_fraction", "DFQController", "FracTrainScheduler", "DFQCostMeter"]
