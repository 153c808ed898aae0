"""mlaprop: compose, launch and verify SGLang's MLA FP8 server test on NVIDIA and AMD GPUs.

The pure core is :func:`mlaprop.compose.compose`, which turns an :class:`~mlaprop.environment.Environment`
and a :class:`~mlaprop.environment.LaunchRequest` into a :class:`~mlaprop.environment.LaunchPlan`.
"""

__version__ = "0.1.0"
